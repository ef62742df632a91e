"""The points where a test makes training fail (REDHEART_FAULTS, `--faults`), kept out of the
loop: the trainer calls each hook of its `Faults`, which does nothing; `InjectedFaults` does
what the test's spec asks. Each hook gets `step`, the optimizer steps completed so far (as the
log counts them); the spec's keys compare with it so:

    stop_at_micro_batch [step + 1, N]   a stop request before micro-batch N of the step under way
    stop_in_backward [step + 1, N]      ... in the backward of its micro-batch N
    oom_at_step step, oom_attempts K    an out-of-memory error in the step under way, K attempts
    nan_at_steps, inf_grad_at_steps     a NaN loss / an Inf gradient in the step under way
    crash_at_step, crash_rank           an error after the step (on that rank; default every rank)
    signal_at_step, signal_rank         a stop request after the step, as SIGTERM would make
    stop_at_step                        a stop request after the step, agreed by every rank
    no_defer_rank                       that rank keeps its finite checks synchronous
"""
from __future__ import annotations

from typing import Any

import torch

from redheart.train.stopping import StopFlag


class Faults:
    """No faults: every hook is a no-op."""

    def stop_before_micro_batch(self, step: int, n: int, stop: StopFlag) -> None:
        pass

    def out_of_memory(self, step: int, attempt: int) -> None:
        pass

    def stop_in_backward(self, step: int, n: int, loss: torch.Tensor, stop: StopFlag) -> None:
        pass

    def corrupt(self, step: int, parts: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
        pass

    def after_step(self, step: int, rank: int, stop: StopFlag) -> bool:
        """After optimizer step `step` (counted from 1): whether the stop it requested is agreed by
        every rank (as one read from the step's sums would be)."""
        return False

    def synchronous_checks(self, rank: int) -> bool:
        return False


def _request_stop(stop: StopFlag, what: str = "a test's stop request") -> None:
    stop.requested, stop.signal_name = True, what


class InjectedFaults(Faults):
    def __init__(self, spec: dict[str, Any]):
        self.spec = spec

    def stop_before_micro_batch(self, step: int, n: int, stop: StopFlag) -> None:
        if self.spec.get("stop_at_micro_batch") == [step + 1, n]:
            _request_stop(stop)

    def out_of_memory(self, step: int, attempt: int) -> None:
        if self.spec.get("oom_at_step") == step and attempt < self.spec.get("oom_attempts", 1):
            raise torch.OutOfMemoryError("CUDA out of memory (injected by a test)")

    def stop_in_backward(self, step: int, n: int, loss: torch.Tensor, stop: StopFlag) -> None:
        if self.spec.get("stop_in_backward") == [step + 1, n]:
            loss.register_hook(lambda *_: _request_stop(stop))

    def corrupt(self, step: int, parts: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
        if step in self.spec.get("nan_at_steps", ()):
            parts["loss"] = parts["loss"] * float("nan")
        if step in self.spec.get("inf_grad_at_steps", ()):
            next(p.grad for p in model.parameters() if p.grad is not None).fill_(float("inf"))

    def after_step(self, step: int, rank: int, stop: StopFlag) -> bool:
        if self.spec.get("crash_at_step") == step and self.spec.get("crash_rank", rank) == rank:
            raise RuntimeError(f"crash injected by a test on rank {rank}")
        if self.spec.get("signal_at_step") == step and self.spec.get("signal_rank", rank) == rank:
            _request_stop(stop, "a test's signal")
        if self.spec.get("stop_at_step") == step:
            _request_stop(stop)
            return True
        return False

    def synchronous_checks(self, rank: int) -> bool:
        return self.spec.get("no_defer_rank", -1) == rank


def injected(spec: dict[str, Any] | None) -> Faults:
    """The faults of a test's spec; none without one."""
    return InjectedFaults(spec) if spec else Faults()
