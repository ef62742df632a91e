"""TensorBoard event files: every scalar of each epoch's metrics record, under `logs/tb_<run>/`
(`tensorboard --logdir training/logs`)."""
from __future__ import annotations

import math
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
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def epoch(self, record: dict[str, Any]) -> None:
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
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)

    def close(self) -> None:
        self.writer.close()
