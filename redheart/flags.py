"""The training commands' flags, and the checked `Config` they make: the preset (or the mode's
choice of it), the --config files, the mode's defaults (`redheart.config.MODES`), the flags,
then each --set. A bad value fails here, naming the flag or file it came from, before the
heavy imports (and, under --gpus, before any process starts).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from typing import Any

from redheart import launch
from redheart.config import MODES, PRESETS, V1_CPU_CHECK, V1_CPU_EPOCHS, Config, apply_mode, build_config
from redheart.overrides import ConfigError, load_yaml, parse_assignment, set_value

log = logging.getLogger("redheart")


def add_arguments(p: argparse.ArgumentParser, samples_help: str) -> None:
    p.add_argument("--preset", choices=PRESETS, help="model preset (default: 730m on a GPU, tiny without one for test modes)")
    p.add_argument("--data", action="append", default=[], metavar="SPEC",
                   help="data file or folder, or FORMAT:PATH (canonical, redheart, scruples, goemotions); repeatable")
    p.add_argument("--eval-data", action="append", default=[], metavar="SPEC",
                   help="evaluation only, never trained on: the final model is scored on it at the end of the run "
                        "(dilemmas:PATH for Scruples dilemmas, or any data spec); repeatable")
    p.add_argument("--output-dir", default="training", help="root of all outputs (default: training)")
    p.add_argument("--resume", metavar="PATH|latest",
                   help="continue from a checkpoint, or the newest resume state; the run keeps the settings it was "
                        "saved with (a flag asking for another value is refused), except --epochs, --device, "
                        "--gpus, train.parallel, train.log_every, train.resume_every_minutes and the "
                        "sweetspot.*/crossover.* settings")
    p.add_argument("--restart", action="store_true", help="start a new run even if an unfinished one is in --output-dir")
    p.add_argument("--samples", type=int, default=None, help=samples_help + " (also SAMPLES=N)")
    p.add_argument("--epochs", type=int, help="number of epochs")
    p.add_argument("--batch-size", help="micro-batch size, or `auto` for the largest that fits (measured on a GPU); "
                   "the accumulation is recomputed to keep the effective batch")
    p.add_argument("--max-records", type=int, help="use a stable slice of this many records")
    p.add_argument("--lr", type=float, help="peak learning rate (the LR sweep replaces it when it runs)")
    p.add_argument("--lr-sweep", dest="lr_sweep", action="store_true", default=None, help="run the LR sweep first")
    p.add_argument("--no-lr-sweep", dest="lr_sweep", action="store_false", help="skip the LR sweep")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--skip-bad-records", action="store_true", help="skip and count bad data lines instead of stopping")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config file(s), applied in order")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config value, e.g. train.lr=3e-4")
    launch.add_arguments(p)
    p.add_argument("--debug", action="store_true", help="debug logging")
    p.add_argument("--verbose", action="store_true", help="log every optimizer step")


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_samples(args) -> int | None:
    if args.samples is not None:
        return args.samples
    env = os.environ.get("SAMPLES")
    if env is None or env == "":
        return None
    try:
        n = int(env)
    except ValueError:
        raise ConfigError(f"SAMPLES={env!r}: expected a whole number") from None
    return n


# Command-line flags that set a config value, for naming where a bad value came from.
FLAG_KEYS = {"train.epochs": "--epochs/--samples", "train.micro_batch": "--batch-size", "train.lr": "--lr",
             "train.seed": "--seed", "train.device": "--device", "data.max_records": "--max-records",
             "data.max_train_records": "--samples"}


def value_origin(key: str, args) -> str | None:
    """Which --set, flag or --config file gave `key` its value (the last one that names it)."""
    for a in reversed(args.set):
        if a.split("=", 1)[0].strip() == key:
            return f"--set {a}"
    for flag in FLAG_KEYS.get(key, "").split("/"):
        if flag and getattr(args, flag[2:].replace("-", "_"), None) is not None:
            return flag
    for f in reversed(args.config):
        try:
            node: Any = load_yaml(f)
        except ConfigError:
            continue
        for part in key.split("."):
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is not KeyError:
            return f"--config {f}"
    return None


def check_device(name: str, flag: str = "--device") -> None:
    """cpu, cuda or cuda:N that this machine has; anything else is a usage error."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"{flag}: cpu, cuda or cuda:N (got {name!r})")
    if name.startswith("cuda"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= n:
            raise ConfigError(f"{flag} {name}: " + (f"only {n} CUDA GPU(s) visible" if n else
                              "no CUDA GPU is visible to PyTorch") + " (use --device cpu)")


def make_config(args, mode: str, preset_name: str) -> Config:
    try:
        cfg = _make_config(args, mode, preset_name)
    except ConfigError as exc:
        m = re.match(r"([a-z_]+(?:\.[a-z_]+)+): ", str(exc))
        origin = value_origin(m.group(1), args) if m else None
        raise ConfigError(f"{exc} [from {origin}]" if origin else str(exc)) from None
    dev = cfg.train.device
    if dev.startswith("cuda"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(dev.split(":", 1)[1]) if ":" in dev and dev.split(":", 1)[1].isdigit() else 0
        if index >= n:
            raise ConfigError(f"train.device={dev}: " + (f"only {n} CUDA GPU(s) visible" if n else
                              "no CUDA GPU is visible to PyTorch") + " (use --device cpu or auto)")
    return cfg


def _make_config(args, mode: str, preset_name: str) -> Config:
    cfg = build_config(preset_name, args.config, [])
    samples = parse_samples(args)
    if samples is not None and samples < 1:
        raise ConfigError(f"--samples/SAMPLES: must be >= 1 (got {samples})")
    apply_mode(cfg, mode, samples)
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    if args.batch_size == "auto":
        cfg.train.auto_micro_batch = True
    elif args.batch_size is not None:
        try:
            size = int(args.batch_size)
        except ValueError:
            raise ConfigError(f"--batch-size: a whole number or auto (got {args.batch_size!r})") from None
        if size < 1:
            raise ConfigError(f"--batch-size: must be >= 1 (got {args.batch_size})")
        eff = cfg.effective_batch
        cfg.train.micro_batch = size
        cfg.train.grad_accum = max(1, math.ceil(eff / size))
        if cfg.effective_batch != eff:
            log.warning("--batch-size %d does not divide the effective batch %d: it becomes %d",
                        size, eff, cfg.effective_batch)
    if args.lr is not None:
        cfg.train.lr = args.lr
    if args.lr_sweep is not None:
        cfg.sweep.enabled = args.lr_sweep
    if args.seed is not None:
        cfg.train.seed = args.seed
    if args.device:
        cfg.train.device = args.device
    if args.max_records is not None:
        cfg.data.max_records = args.max_records
    if args.skip_bad_records:
        cfg.data.skip_bad_records = True
    if args.data:
        cfg.data.paths = [_absolute_spec(s) for s in args.data]
    if getattr(args, "eval_data", None):
        cfg.data.eval_paths = [_absolute_spec(s) for s in args.eval_data]
    cfg.output_dir = args.output_dir
    for a in args.set:
        k, v = parse_assignment(a)
        set_value(cfg, k, v)
    return cfg.validate()


def _absolute_spec(spec: str) -> str:
    head, sep, tail = spec.partition(":")
    if sep and head in ("canonical", "redheart", "scruples", "goemotions", "dilemmas"):
        return f"{head}:{os.path.abspath(os.path.expanduser(tail))}"
    return os.path.abspath(os.path.expanduser(spec))


def choose_presets(args, mode: str, announce: bool = True) -> tuple[str, ...]:
    """--preset, or the mode's presets; its CPU preset when there is no GPU (said on stderr)."""
    if args.preset:
        return (args.preset,)
    m = MODES[mode]
    if m.cpu_preset and not gpu_available():
        if announce:
            print(f"[redheart] no GPU found: {mode} uses the '{m.cpu_preset}' preset (choose another with --preset)",
                  file=sys.stderr)
        return (m.cpu_preset,)
    return m.presets


def bounded_on_cpu(cfg: Config, args) -> bool:
    """unified-test-v1 without a GPU (and without --max-records): a bounded check of the preset
    (`redheart.config.V1_CPU_CHECK`), over everything else; True when it applies."""
    if args.max_records is not None or gpu_available():
        return False
    for key, value in V1_CPU_CHECK.items():
        set_value(cfg, key, value, origin="unified-test-v1 on a CPU")
    cfg.train.epochs = min(cfg.train.epochs, V1_CPU_EPOCHS)
    return True


def checked_config(args, mode: str) -> tuple[Config, str]:
    """The run's configuration and preset, every value and --resume checked: bad ones fail here,
    before the heavy imports (and, under --gpus, before any process starts)."""
    (chosen,) = choose_presets(args, mode)
    cfg = make_config(args, mode, chosen)
    check_resume_path(args.resume)
    from redheart.feasibility import check_cpu_preset

    check_cpu_preset(args, mode, cfg, gpu_available)  # 730m without a GPU: refused, unless asked for
    return cfg, chosen


def check_resume_path(resume: str | None) -> None:
    if resume and resume != "latest" and not os.path.exists(resume):
        raise ConfigError(f"--resume {resume}: no such checkpoint (--resume latest takes the newest "
                          f"sound resume state of --output-dir)")
