"""TensorBoard event files: every scalar of each epoch's metrics record, under `logs/tb_<run>/`
(`tensorboard --logdir training/logs`)."""
from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics -> {"val/emotion_acc": 0.5, ...} (numbers only)."""
    out: dict[str, float] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[key] = float(v)
    return out


class TensorBoard:
    """The event files of a run. A write that fails (a full disk: raised here, or in the
    writer's own thread, whose traceback is kept off the console) is a failed write like any
    other (`ckio.report_write_failure`: the run stops); the writer takes nothing more."""

    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.folder = Path(folder)
        self.broken = False
        _quiet_writer_threads()
        self.writer = None
        with self._guard():
            self.writer = SummaryWriter(log_dir=str(folder))

    @contextmanager
    def _guard(self) -> Iterator[None]:
        from redheart.ckpt import io as ckio

        try:
            yield
            injected = ckio.injected_failure(self.folder / "events.out.tfevents")  # a test's full disk
            if injected is not None:
                raise injected
        except OSError as exc:
            if not self.broken:
                self.broken = True
                ckio.report_write_failure(ckio.WriteFailed(self.folder, exc, 64 * 1024))

    def epoch(self, record: dict[str, Any]) -> None:
        if self.broken:
            return
        with self._guard():
            self._epoch(record)

    def _epoch(self, record: dict[str, Any]) -> None:
        """Every number of the record at step = epoch (`memory/t`, a clock reading, left out);
        the per-step LRs of `lr_steps`, when the record has them, as `lr_per_step` at step =
        optimizer step."""
        skip = {"epoch", "global_step", "timestamp"}
        for tag, value in flatten({k: v for k, v in record.items() if k not in skip}).items():
            if tag == "memory/t":
                continue
            self.writer.add_scalar(tag, value, record["epoch"])
        lrs = record.get("lr_steps") or []
        first = int(record["global_step"]) - len(lrs) + 1
        for i, lr in enumerate(lrs):
            self.writer.add_scalar("lr_per_step", float(lr), first + i)
        self.writer.flush()

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.broken:
            return
        with self._guard():
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, step)

    def close(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.close()
        except OSError as exc:
            if not self.broken:
                from redheart.ckpt import io as ckio

                self.broken = True
                ckio.report_write_failure(ckio.WriteFailed(self.folder, exc, 64 * 1024))


def _quiet_writer_threads() -> None:
    """TensorBoard's writer thread re-raises a failed write, and Python prints its traceback;
    the writer hands the error to the next call in the main thread (`TensorBoard._guard`), so an
    OSError of that thread is not printed a second time."""
    if getattr(threading.excepthook, "_redheart", False):
        return
    previous = threading.excepthook

    def hook(args) -> None:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

        if isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook._redheart = True  # type: ignore[attr-defined]
    threading.excepthook = hook
