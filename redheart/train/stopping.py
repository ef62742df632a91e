"""How training stops before its end: the stop request a signal (or a failed write) sets, the
exception that leaves an optimizer step midway, and the one that ends `Trainer.fit` with a
resumable state saved."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from redheart.model.network import Block


class TrainingStopped(Exception):
    """Training stopped before the end with a resumable state saved (signal, OOM, bad steps)."""

    def __init__(self, reason: str, resume_path: str | None, code: int):
        super().__init__(reason)
        self.reason, self.resume_path, self.code = reason, resume_path, code


@dataclass
class StopFlag:
    requested: bool = False
    signal_name: str = ""
    write_failure: Exception | None = None  # the first failed write (`ckio.report_write_failure`), if one stopped it


class StepAbandoned(Exception):
    """A stop request met between the micro-batches of an optimizer step: the step's partial
    gradients are dropped and the RNG streams put back as they were before it (`Trainer.accumulate`),
    so the state saved is that of the last completed step and a resume redoes this one exactly."""


def stop_per_layer(model: torch.nn.Module, abandon: Callable[[], bool]) -> None:
    """On the CPU a micro-batch of a large preset takes a minute (730m on two cores): a stop
    request is also met in its forward and backward, at every Transformer layer (a forward
    hook, and a gradient hook on the layer's output), where it leaves the step as between
    micro-batches (`StepAbandoned`) when `abandon()` says so. The hooks read a flag; they change
    no number."""

    def check(*_):
        if abandon():
            raise StepAbandoned()

    def after_layer(_module, _args, out):
        check()
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(check)

    for m in model.modules():
        if isinstance(m, Block):
            m.register_forward_hook(after_layer)
