"""Logging for a run: console and `logs/training_<run>.log`, and per-step progress (a tqdm bar
on a terminal, plain periodic lines under nohup or a pipe)."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from redheart import heads

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
    console = _Console(sys.stderr)
    console.setFormatter(logging.Formatter(_FMT, "%H:%M:%S"))
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    console._redheart_console = True  # type: ignore[attr-defined]
    log.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = _LogFile(log_file, encoding="utf-8")
        fh.setFormatter(logging.Formatter(_FMT, "%Y-%m-%d %H:%M:%S"))
        log.addHandler(fh)


class _LogFile(logging.FileHandler):
    """The log file. A line that cannot be written (a full disk) is a failed write like any
    other (`ckio.report_write_failure`: the run stops) instead of logging's traceback on the
    console; the file takes no more lines, the console goes on."""

    broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.broken:
            return
        from redheart.ckpt import io as ckio

        injected = ckio.injected_failure(Path(self.baseFilename))
        if injected is not None:
            self._failed(injected, record)
            return
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            self._failed(exc, record)
            return
        super().handleError(record)

    def _failed(self, exc: OSError, record: logging.LogRecord) -> None:
        from redheart.ckpt import io as ckio

        self.broken = True
        try:
            need = len(self.format(record)) + 1
        except Exception:  # noqa: BLE001 - the size is only for the message
            need = None
        ckio.report_write_failure(ckio.WriteFailed(Path(self.baseFilename), exc, need))


class _Console(logging.StreamHandler):
    """The console: on a terminal, lines go through tqdm so they print above a running bar
    instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        if not self.stream.isatty():
            return super().emit(record)
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def log_epoch(record: dict[str, Any], epochs: int) -> None:
    """An epoch's lines from its metrics record: losses, speed, validation, collapsed heads."""
    train, val, val_ema, epoch = record["train"], record["val"], record["val_ema"], record["epoch"]
    log.info("epoch %d/%d: train loss %.4f | val loss %.4f%s | %.1f samples/s%s | %.0fs", epoch, epochs,
             train.get("loss", float("nan")), val["loss"], f" | ema val loss {val_ema['loss']:.4f}" if val_ema else "",
             record["samples_per_s"], f" | MFU {record['mfu']:.1%}" if record["mfu"] is not None else "",
             record["seconds"])
    log.info("  val: %s", "  ".join(f"{k}={v:.4f}" for k, v in val.items() if k != "loss"))
    for head, why in record["collapsed"].items():
        log.warning("epoch %d: the %s head has collapsed on validation: %s", epoch, head, why)


def duration(seconds: float) -> str:
    """42s, 3m07s, 2h05m."""
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Per-epoch progress, called by the trainer after every optimizer step.

    On a terminal: a tqdm bar per epoch (steps, elapsed and the epoch's ETA) with the step's
    loss, the LR, samples/s and the ETA of the whole run; the periodic lines below go to the
    log file only. Under nohup or a pipe: those lines on the console too, every `every`
    optimizer steps (every step with `verbose`, on a terminal as well). Device values are read
    (a host sync) only for a step that is shown. The other ranks of a run on several GPUs keep a
    `quiet` one: it shows nothing, but tells the trainer the same steps to settle (`logs_next`).
    """

    def __init__(self, epochs: int, every: int, verbose: bool, interactive: bool | None = None,
                 quiet: bool = False):
        self.epochs, self.every, self.verbose, self.quiet = epochs, every, verbose, quiet
        self.interactive = not quiet and (sys.stderr.isatty() if interactive is None else interactive)
        self.bar = None

    def __call__(self, epoch: int, steps: int, start: int) -> "Progress":
        self.epoch, self.steps, self.done = epoch, steps, start
        self.t0, self.run_steps = time.time(), 0
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch}/{self.epochs}", unit="step",
                            dynamic_ncols=True, leave=True, file=sys.stderr)
        return self

    def rates(self, trainer) -> tuple[float, float, float]:
        """(samples/s, seconds left in this epoch, seconds left in the run) from this epoch's
        steps so far; the run's ETA leaves out validation and checkpoint time."""
        elapsed = max(time.time() - self.t0, 1e-9)
        per_step = elapsed / max(self.run_steps, 1)
        samples_per_step = trainer.epoch_stats.samples / max(self.done, 1)  # both count from the epoch's start
        left_epoch = (self.steps - self.done) * per_step
        left_run = left_epoch + (self.epochs - self.epoch) * self.steps * per_step
        return self.run_steps * samples_per_step / elapsed, left_epoch, left_run

    def logs_next(self) -> bool:
        """Whether the next `step` writes a line (which reads the step's loss from the device)."""
        done = self.done + 1
        return self.verbose or done % self.every == 0 or done == self.steps

    def step(self, trainer, parts, applied: bool) -> None:
        logs = self.logs_next()
        self.done += 1
        self.run_steps += 1
        if self.bar is not None:
            self.bar.update(1)
        if not logs or self.quiet:
            return
        lr = trainer.scheduler.get_last_lr()[0]
        rate, left_epoch, left_run = self.rates(trainer)
        if self.bar is not None:
            self.bar.set_postfix({"loss": f"{float(parts['loss']):.4f}", "lr": f"{lr:.2e}",
                                  "samples/s": f"{rate:.1f}", "run ETA": duration(left_run)})
        comps = " ".join(f"{k}={float(v):.4f}" for k, v in parts.items()
                         if k in ("loss", "rdrop", *heads.names(), "grad_norm"))
        log.info("epoch %d/%d step %d/%d (global %d) %s lr=%.2e %.1f samples/s eta %s (epoch), %s (run)%s",
                 self.epoch, self.epochs, self.done, self.steps, trainer.global_step, comps, lr, rate,
                 duration(left_epoch), duration(left_run), "" if applied else " [skipped: non-finite]",
                 extra={"file_only": self.interactive and not self.verbose})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
