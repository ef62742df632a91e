"""Learning-rate schedule per optimizer step: linear warm-up, then cosine decay."""
from __future__ import annotations

import functools
import math

import torch


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                  min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(round(total_steps * warmup_ratio))
    fn = functools.partial(lr_factor, warmup=warmup, total=total_steps, min_ratio=min_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
