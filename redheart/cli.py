"""The command line: command -> function, argument parsing only.

    redheart unified-test | unified-train | unified-test-v1 | train-local | validate
    redheart info | predict | evaluate | crossover | plot
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from redheart.config import PRESETS, Config, ConfigError, build_config, load_yaml

log = logging.getLogger("redheart")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # a signal before the run could stop cleanly (the shell's 128 + SIGINT)


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: `error: ...` naming the argument, exit code 2."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def common_args(p: argparse.ArgumentParser, samples_help: str) -> None:
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
                        "--gpus, train.parallel, train.log_every and the sweetspot.*/crossover.* settings")
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
    g = p.add_argument_group("several GPUs or hosts (launched through torchrun)")
    g.add_argument("--gpus", type=int, default=1, help="processes (GPUs) on this host; >1 runs under torchrun")
    g.add_argument("--nnodes", type=int, default=1, help="number of hosts")
    g.add_argument("--node-rank", type=int, default=0, help="this host's rank (0 .. nnodes-1)")
    g.add_argument("--master-addr", default="127.0.0.1", help="address of the host with node rank 0")
    g.add_argument("--master-port", type=int, default=29500)
    g.add_argument("--rdzv-endpoint", help="host:port of a c10d rendezvous instead of --master-addr/--master-port")
    p.add_argument("--debug", action="store_true", help="debug logging")
    p.add_argument("--verbose", action="store_true", help="log every optimizer step")


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


def _check_device(name: str, flag: str = "--device") -> None:
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
    if mode in ("unified-test", "unified-test-v1"):
        cfg.sweep.enabled = True
        cfg.sweep.steps = 20
        cfg.train.save_every = 1  # a snapshot per epoch, so Sweet Spot and Crossover have a choice
        cfg.train.epochs = samples or 2
    elif mode == "unified-train":
        if samples is not None:
            cfg.train.epochs = samples
    elif mode == "train-local":
        cfg.data.max_train_records = samples or 3
        cfg.memory.monitor = True
        cfg.train.epochs = 2
        cfg.train.log_every = 1
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
        from redheart.train.batching import accumulation

        eff = cfg.effective_batch
        cfg.train.micro_batch = size
        cfg.train.grad_accum = accumulation(eff, size)
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
    from redheart.config import parse_assignment, set_value

    for a in args.set:
        k, v = parse_assignment(a)
        set_value(cfg, k, v)
    return cfg.validate()


def _absolute_spec(spec: str) -> str:
    head, sep, tail = spec.partition(":")
    if sep and head in ("canonical", "redheart", "scruples", "goemotions", "dilemmas"):
        return f"{head}:{os.path.abspath(os.path.expanduser(tail))}"
    return os.path.abspath(os.path.expanduser(spec))


def choose_preset(args, mode: str) -> str:
    if args.preset:
        return args.preset
    if mode in ("unified-test", "train-local") and not _gpu_available():
        print(f"[redheart] no GPU found: {mode} uses the 'tiny' preset (choose another with --preset)", file=sys.stderr)
        return "tiny"
    return "730m"


def test_faults() -> dict[str, Any]:
    """Failures injected by the test suite (REDHEART_FAULTS='{"oom_at_step": 3}'); empty otherwise."""
    raw = os.environ.get("REDHEART_FAULTS", "")
    if not raw:
        return {}
    try:
        faults = json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError(f"REDHEART_FAULTS: not valid JSON: {raw!r}") from None
    if not isinstance(faults, dict):
        raise ConfigError("REDHEART_FAULTS: expected a JSON object")
    return faults


LAUNCH_FLAGS = {"--gpus": 1, "--nnodes": 1, "--node-rank": 1, "--master-addr": 1, "--master-port": 1,
                "--rdzv-endpoint": 1}


def launch_distributed(args, argv: list[str]) -> int:
    """Re-run this command under torchrun with one process per GPU (or CPU process with gloo)."""
    import subprocess

    device = args.device or "auto"
    for a in args.set:
        if a.startswith("train.device="):
            device = a.split("=", 1)[1]
    if device != "cpu":
        import torch  # only here: the launcher itself computes nothing (2 s saved per CPU launch)

        if not torch.cuda.is_available():
            raise ConfigError(f"--gpus {args.gpus}: no GPU is visible to PyTorch here "
                              "(add --device cpu to run that many CPU processes with gloo)")
        if torch.cuda.device_count() < args.gpus:
            raise ConfigError(f"--gpus {args.gpus}: only {torch.cuda.device_count()} GPU(s) are visible on this host")
    rest, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            skip = 0 if "=" in a else LAUNCH_FLAGS[name]
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.gpus}",
           f"--nnodes={args.nnodes}", "--max-restarts=0"]
    if args.rdzv_endpoint:
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}"]
    elif args.nnodes > 1:
        cmd += [f"--node-rank={args.node_rank}", f"--master-addr={args.master_addr}", f"--master-port={args.master_port}"]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", "redheart", *rest]
    print(f"[redheart] launching {args.gpus * args.nnodes} processes: {' '.join(cmd)}", file=sys.stderr)
    import signal
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        exit_file = Path(tmp) / "exit_code"
        # torchrun passes SIGTERM/SIGINT on to every rank; give them time to save before it kills
        env = {**os.environ, "REDHEART_EXIT_FILE": str(exit_file),
               "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "900")}
        proc = subprocess.Popen(cmd, env=env, preexec_fn=_stop_with_parent(os.getpid()))
        forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = proc.wait()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        # rank 0's own exit code (75 for a clean stop, ...) rather than torchrun's summary of it
        return int(exit_file.read_text()) if exit_file.exists() else code


def _stop_with_parent(parent: int):
    """For torchrun's process: SIGTERM when the launcher dies, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), so its ranks stop after their step and save, as on Ctrl-C, instead of
    training on without anyone waiting for them."""
    import signal

    def arm() -> None:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: as before
            return
        if os.getppid() != parent:  # the launcher died before the line above
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def checked_config(args, mode: str) -> tuple[Config, str]:
    """The run's configuration and preset, every value and --resume checked: bad ones fail here,
    before the heavy imports (and, under --gpus, before any process starts)."""
    chosen = choose_preset(args, mode)
    cfg = make_config(args, mode, chosen)
    check_resume_path(args.resume)
    from redheart.feasibility import check_cpu_preset

    check_cpu_preset(args, mode, cfg, _gpu_available)  # 730m without a GPU: refused, unless asked for
    return cfg, chosen


def cmd_train(args, mode: str) -> int:
    cfg, _ = checked_config(args, mode)
    faults = test_faults()
    from redheart.data.importers import load_data

    # every data file read and checked now: a bad one fails at once, before the heavy imports
    # and before the run's folder is made
    data = load_data(cfg.data.paths, cfg.data.skip_bad_records)
    from redheart.run import RunOptions, train

    from redheart.resume_flags import asked_settings

    asked = asked_settings(args, mode, parse_samples(args))
    opts = RunOptions(resume=args.resume, restart=args.restart, epochs_given="train.epochs" in asked,
                      debug=args.debug, verbose=args.verbose, analysis=mode != "train-local",
                      faults=faults, mode=mode, data=data, asked=asked)
    return train(cfg, opts)


def cmd_unified_test_v1(args) -> int:
    from redheart.run import RunOptions, train

    presets = [args.preset] if args.preset else ["v1-800m", "v1-320m"]
    gpu = _gpu_available()
    worst = 0
    for name in presets:
        cfg = make_config(args, "unified-test-v1", name)
        if not gpu and args.max_records is None:
            cfg.data.max_records, cfg.train.grad_accum, cfg.sweep.enabled = 40, 4, False
            cfg.train.epochs = min(cfg.train.epochs, 2)
            print(f"[redheart] no GPU found: {name} runs a bounded check on CPU "
                  f"({cfg.data.max_records} records, {cfg.train.epochs} epochs, no LR sweep)", file=sys.stderr)
        cfg.output_dir = os.path.join(args.output_dir, name)
        opts = RunOptions(resume=args.resume, restart=True if args.resume is None else args.restart,
                          debug=args.debug, verbose=args.verbose, mode="unified-test-v1")
        code = train(cfg, opts)
        worst = max(worst, code)
        if code:
            break
    return worst


def cmd_info(args) -> int:
    from redheart.model.modules import preset_parameter_counts
    from redheart.train.memory import estimate

    cfg = build_config(args.preset, args.config, args.set)
    counts = preset_parameter_counts(cfg)
    out: dict[str, Any] = {"preset": args.preset, "trainable_parameters": counts}
    if args.memory:
        out["memory_estimate_gib"] = estimate(cfg, counts["total"])
    print(json.dumps(out, indent=2))
    return 0


def cmd_validate(args) -> int:
    from redheart.validate import run_checks

    cfg = make_config(args, "validate", args.preset or ("730m" if _gpu_available() else "tiny"))
    return run_checks(cfg, mode=args.target)


def check_resume_path(resume: str | None) -> None:
    if resume and resume != "latest" and not os.path.exists(resume):
        raise ConfigError(f"--resume {resume}: no such checkpoint (--resume latest takes the newest "
                          f"sound resume state of --output-dir)")


def cmd_predict(args) -> int:
    for flag in ("checkpoint", "file", "device"):
        if isinstance(getattr(args, flag), list):  # argparse reads `--file=--` as no value at all
            raise ConfigError(f"--{flag}: expected a value")
    if args.file and not os.path.isfile(args.file):
        raise ConfigError(f"--file {args.file}: no such file")
    if not os.path.isfile(args.checkpoint):
        raise ConfigError(f"--checkpoint {args.checkpoint}: no such file")
    from redheart.predict import predict_command

    return predict_command(args)


def cmd_evaluate(args) -> int:
    if not os.path.isfile(args.checkpoint):
        raise ConfigError(f"--checkpoint {args.checkpoint}: no such file")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1 (got {args.batch_size})")
    if args.device != "auto":
        _check_device(args.device)
    from redheart.evaluate import evaluate_command

    return evaluate_command(args)


def cmd_crossover(args) -> int:
    from redheart.analysis_cli import crossover_command

    return crossover_command(args)


def cmd_plot(args) -> int:
    from redheart.analysis_cli import plot_command

    return plot_command(args)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="redheart", description="Red Heart AI training system")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    for name, help_, samples in [
        ("unified-test", "quick end-to-end run: LR sweep -> 2 epochs -> Sweet Spot -> Crossover", "number of epochs"),
        ("unified-train", "full training (60 epochs by default)", "number of epochs"),
        ("unified-test-v1", "the quick test on the legacy 800M and 320M presets", "number of epochs"),
        ("train-local", "training on a few samples with memory monitored every step", "number of training samples (default 3)"),
        ("validate", "integrity check without training", "unused"),
    ]:
        sp = sub.add_parser(name, help=help_)
        common_args(sp, samples)
        if name == "validate":
            sp.add_argument("--target", default="unified-train", choices=["unified-test", "unified-train"],
                            help="which mode's needs to check (disk space, preset)")
    sp = sub.add_parser("info", help="a preset's trainable parameters per module, as JSON")
    sp.add_argument("--preset", choices=PRESETS, default="730m")
    sp.add_argument("--memory", action="store_true", help="add the training-memory estimate")
    sp.add_argument("--config", action="append", default=[])
    sp.add_argument("--set", action="append", default=[])
    sp = sub.add_parser("predict", help="predict the four heads for texts with a trained checkpoint")
    sp.add_argument("--checkpoint", required=True, help="a checkpoint, snapshot or crossover_final.pth")
    sp.add_argument("texts", nargs="*", help="texts; none = read one text per line from --file or stdin")
    sp.add_argument("--file", help="a file with one text per line")
    sp.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    sp.add_argument("--debug", action="store_true", help="an internal error shows its traceback")
    sp = sub.add_parser("evaluate", help="score a checkpoint on data: every head's metrics, or Scruples dilemmas")
    sp.add_argument("--checkpoint", required=True, help="a checkpoint, snapshot or crossover_final.pth")
    sp.add_argument("--data", action="append", required=True,
                    help="dilemmas:PATH (Scruples dilemmas) or any data spec; repeatable: one JSON line each")
    sp.add_argument("--split", default="all", choices=["all", "train", "val", "test"],
                    help="all records (default), or that split of them by the checkpoint's split fractions")
    sp.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    sp.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (does not change any result)")
    sp = sub.add_parser("crossover", help="run Sweet Spot and Parameter Crossover on a finished run directory")
    sp.add_argument("run_dir", nargs="?", default="training")
    sp.add_argument("--run-id", help="which run in the directory (default: the newest with snapshots)")
    sp.add_argument("--set", action="append", default=[], help="override sweetspot.* / crossover.* values")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--debug", action="store_true")
    sp = sub.add_parser("plot", help="draw the training curves of a run from its metrics record")
    sp.add_argument("run_dir", nargs="?", default="training")
    sp.add_argument("--run-id")
    sp.add_argument("--out", help="output PNG path (default: logs/training_curves_<run>.png in the run directory)")
    sp.add_argument("--dpi", type=float, default=100, help="image resolution, dots per inch (default 100: 1300x1000 pixels)")
    return p


# The errors that mean "the input is wrong", each with a message for the user: module -> class.
USER_ERRORS = {"redheart.config": "ConfigError", "redheart.ckpt.io": "CheckpointError",
               "redheart.data.schema": "DataError", "redheart.model.encoder": "EncoderError",
               "redheart.run": "UsageError"}


def user_error_types() -> tuple[type, ...]:
    """The classes of USER_ERRORS among the loaded modules (an error raised was loaded with its
    module): so that a bad flag fails before torch is imported."""
    return tuple(getattr(sys.modules[m], name) for m, name in USER_ERRORS.items() if m in sys.modules)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("unified-test", "unified-train", "train-local"):
            if (args.gpus < 1 or args.nnodes < 1):
                raise ConfigError("--gpus and --nnodes must be >= 1")
            if (args.gpus > 1 or args.nnodes > 1) and "LOCAL_RANK" not in os.environ:
                _, chosen = checked_config(args, args.command)  # a bad value: one error, no launch
                # the preset chosen without a GPU is said once, here, and passed on to the ranks
                return launch_distributed(args, argv if args.preset else [*argv, "--preset", chosen])
            return cmd_train(args, args.command)
        handlers = {"unified-test-v1": cmd_unified_test_v1, "info": cmd_info, "validate": cmd_validate,
                    "predict": cmd_predict, "evaluate": cmd_evaluate, "crossover": cmd_crossover, "plot": cmd_plot}
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("error: interrupted before the run could stop cleanly (nothing of it was saved since its "
              "last checkpoint)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:  # an unusable path given by the user: a file where a folder is needed, ...
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if isinstance(exc, user_error_types()):
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if getattr(args, "debug", False):
            raise
        where = _traceback_to_log_file()
        print(f"error: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              f"(traceback {'in ' + where if where else 'with --debug'})", file=sys.stderr)
        return 1


def _traceback_to_log_file() -> str | None:
    """Write the current exception's traceback to the run's log file, if one is open."""
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.stream.write(traceback.format_exc())
            h.flush()
            return h.baseFilename
    return None
