"""Whether a preset can train on this machine without a GPU in reasonable time, said before it
starts: the memory it needs and the time an optimizer step and the run would take here.

`unified-train` on a machine without a GPU refuses its default preset (730m: a first optimizer
step of about a quarter of an hour on two cores, 17 GiB of memory) with these figures and the
ways on; a preset named with --preset is trained, after a warning with the same figures. The
time is the run's model FLOPs (`train.flops`, from the texts' approximate token counts) at this
CPU's measured float32 matrix-product rate times `CPU_EFFICIENCY`, the share of it that a CPU
training step reaches (small products, attention, the optimizer, R-Drop's second pass).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from redheart.config import Config

CPU_EFFICIENCY = 0.5  # measured: 730m on 2 cores, see `cpu_estimate`
REASONABLE_STEP_S = 120.0  # beyond this per optimizer step, a CPU run of the preset is not reasonable


def cpu_matmul_gflops(seconds: float = 0.2) -> float:
    """float32 matrix-product rate of this CPU (GFLOP/s), on the threads torch uses."""
    import torch

    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        done += 1
    return 2 * n ** 3 * done / (time.perf_counter() - t0) / 1e9


def approx_tokens(text: str, max_tokens: int) -> int:
    """WordPiece tokens of an English text, roughly (1.3 a word, [CLS] and [SEP])."""
    return min(max_tokens, int(len(text.split()) * 1.3) + 2)


def cpu_estimate(cfg: Config, texts: list[str]) -> dict[str, Any]:
    """Memory (GiB) and time (seconds per optimizer step, per run) of `cfg` on this CPU."""
    import psutil

    from redheart.model.modules import preset_parameter_counts
    from redheart.train.flops import train_flops
    from redheart.train.memory import estimate

    params = preset_parameter_counts(cfg)["total"]
    lengths = [approx_tokens(t, cfg.model.max_tokens) for t in texts] or [cfg.model.max_tokens]
    records = min(len(texts), cfg.data.max_records) if cfg.data.max_records else len(texts)
    train = max(1, int(records * cfg.data.train_frac))
    if cfg.data.max_train_records:
        train = min(train, cfg.data.max_train_records)
    mean = sum(lengths) / len(lengths)
    per_text = train_flops(cfg.model, [round(mean)], cfg.tech.rdrop_alpha > 0, False)
    gflops = cpu_matmul_gflops()
    step_s = per_text * cfg.effective_batch / (gflops * 1e9 * CPU_EFFICIENCY)
    steps = math.ceil(train / cfg.effective_batch) * cfg.train.epochs
    return {"params": params, "memory_gib": estimate(cfg, params)["total_gib"],
            "ram_gib": psutil.virtual_memory().total / 2**30, "gflops": gflops, "step_s": step_s,
            "steps": steps, "run_s": step_s * steps}


def _time(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def describe(cfg: Config, est: dict[str, Any]) -> str:
    return (f"preset {cfg.preset} ({est['params'] / 1e6:.0f}M parameters) needs an estimated "
            f"{est['memory_gib']:.1f} GiB of memory (this machine has {est['ram_gib']:.1f} GiB) and about "
            f"{_time(est['step_s'])} per optimizer step of {cfg.effective_batch} texts on this CPU "
            f"({est['gflops']:.0f} GFLOP/s measured), {_time(est['run_s'])} for {est['steps']} steps "
            f"({cfg.train.epochs} epochs of this data)")


def reasonable(est: dict[str, Any]) -> bool:
    return est["step_s"] <= REASONABLE_STEP_S


def check_cpu_preset(args, mode: str, cfg: Config, gpu: Callable[[], bool]) -> None:
    """A training run without a GPU (`--device cpu`, or `auto` on a machine without one) of a
    preset this CPU does not train in reasonable time: refused when the preset came by default
    (ConfigError, with the estimate and what to do), trained after a warning when named. Not for
    a resume (the state's preset is used) nor for the tiny preset."""
    import os
    import sys

    from redheart.config import ConfigError

    if args.resume or cfg.preset == "tiny":  # (before `gpu()`, which imports torch)
        return
    if not (cfg.train.device == "cpu" or (cfg.train.device == "auto" and not gpu())):
        return
    from redheart.data.importers import load_data

    texts = [r.text for r in load_data(cfg.data.paths, cfg.data.skip_bad_records).records]
    est = cpu_estimate(cfg, texts)
    if reasonable(est):
        return
    if args.preset is None:
        raise ConfigError(f"{mode} without a GPU: its default {describe(cfg, est)}. Train it on a machine with a GPU; "
                          f"or give --preset tiny for a run this CPU finishes in minutes; or --preset {cfg.preset} to "
                          f"train it here all the same (a stop request, Ctrl-C or SIGTERM, is honoured between "
                          f"micro-batches with a state that resumes)")
    if os.environ.get("RANK", "0") == "0":
        print(f"[redheart] warning: no GPU: {describe(cfg, est)}. Training it here all the same, as --preset asks; "
              f"a stop request (Ctrl-C, SIGTERM) is honoured between micro-batches with a state that resumes",
              file=sys.stderr)
