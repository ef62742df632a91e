"""What an out-of-memory error in a training step leads to: a retry of the step at half the
micro-batch, the Dynamic Swap Manager turned on, or a stop with a resumable state. The choice
is a pure function (`oom_action`); `Trainer.accumulate` carries it out."""
from __future__ import annotations

from redheart.config import MemoryConfig


def oom_action(micro_batch: int, attempt: int, memory: MemoryConfig, swap: bool, on_gpu: bool, fsdp: bool,
               ranks_defer: bool) -> tuple[str, str]:
    """What the `attempt`-th out-of-memory error of a step at `micro_batch` leads to: "retry"
    (half the micro-batch, the same samples), "swap" (the swap manager on; `swap`: already on),
    or "stop" and why. `ranks_defer`: several ranks leave their finite checks on the device."""
    # Under FSDP the other ranks wait in a collective of the step this rank left: no retry.
    if micro_batch > 1 and attempt <= memory.max_oom_retries and not fsdp:
        return "retry", ""
    if not swap and memory.swap != "off" and on_gpu and not fsdp:
        if not ranks_defer:
            return "swap", ""
        # the swap manager's update needs the synchronous check: this rank would read its
        # steps (and the others' stop requests) a step before the other ranks do
        return "stop", "one rank cannot turn the swap manager on alone while the ranks defer their checks"
    return "stop", "a rank cannot retry alone under FSDP" if fsdp else "nothing smaller fits"
