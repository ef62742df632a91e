"""Logging for a run: console and `logs/training_<run>.log`, and per-step progress (a tqdm bar
on a terminal, plain periodic lines under nohup or a pipe)."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("redheart")

_FMT = "%(asctime)s %(levelname)-7s %(message)s"


def setup_logging(debug: bool = False, log_file: Path | None = None) -> None:
    level = logging.DEBUG if debug else logging.INFO
    log.setLevel(level)
    log.propagate = False
    for h in list(log.handlers):
        if isinstance(h, logging.FileHandler) or getattr(h, "_redheart_console", False):
            log.removeHandler(h)
            h.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_FMT, "%H:%M:%S"))
    console._redheart_console = True  # type: ignore[attr-defined]
    log.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter(_FMT, "%Y-%m-%d %H:%M:%S"))
        log.addHandler(fh)


class Progress:
    """Per-epoch progress. `step()` is called after every optimizer step; it reads device values
    (a host sync) only when it prints: every `every` steps, or every step with `verbose`."""

    def __init__(self, epochs: int, every: int, verbose: bool, interactive: bool | None = None):
        self.epochs, self.every, self.verbose = epochs, every, verbose
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = None

    def __call__(self, epoch: int, steps: int, start: int) -> "Progress":
        self.epoch, self.steps, self.done = epoch, steps, start
        self.t0, self.samples, self.run_steps = time.time(), 0, 0
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch}/{self.epochs}", unit="step",
                            dynamic_ncols=True, leave=True, file=sys.stderr)
        return self

    def step(self, trainer, parts, applied: bool) -> None:
        self.done += 1
        self.run_steps += 1
        self.samples += trainer.cfg.effective_batch
        show = self.verbose or self.done % self.every == 0 or self.done == self.steps
        if self.bar is not None:
            self.bar.update(1)
            if show:
                self.bar.set_postfix(loss=f"{float(parts['loss']):.4f}", lr=f"{trainer.scheduler.get_last_lr()[0]:.2e}",
                                     sps=f"{self.samples / max(time.time() - self.t0, 1e-9):.1f}")
            if self.verbose:
                log.debug("step %d loss %.5f", trainer.global_step, float(parts["loss"]))
            return
        if show:
            elapsed = time.time() - self.t0
            rate = self.samples / max(elapsed, 1e-9)
            eta = (self.steps - self.done) * elapsed / self.run_steps
            comps = " ".join(f"{k}={float(v):.4f}" for k, v in parts.items()
                             if k in ("loss", "rdrop", "emotion", "bentham", "regret", "surd"))
            log.info("epoch %d step %d/%d (global %d) %s lr=%.2e %.1f samples/s eta %.0fs%s", self.epoch,
                     self.done, self.steps, trainer.global_step, comps, trainer.scheduler.get_last_lr()[0],
                     rate, eta, "" if applied else " [skipped: non-finite]")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
