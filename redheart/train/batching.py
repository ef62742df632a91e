"""The micro-batch and the accumulation: how many samples one forward and backward takes, and
how many of those make an optimizer step. `accumulation` is the one rule for the second
(`--batch-size N`, `--batch-size auto`); `MicroBatching` owns the sizes a run trains at, which
an out-of-memory retry halves. Nothing here imports torch: the command line uses it before
anything heavy is loaded."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def accumulation(effective: int, micro_batch: int) -> int:
    """Micro-batches per optimizer step at `micro_batch` for an effective batch of `effective`:
    rounded up where it does not divide (the effective batch then grows to the next multiple)."""
    return max(1, math.ceil(effective / micro_batch))


@dataclass
class MicroBatching:
    """The micro-batch of a run: `size` samples, and with `tokens` > 0 at most that many padded
    tokens (`data.dataset.micro_batches`). It starts at the configured sizes; an out-of-memory
    retry halves both for the rest of the run (`halve`) and a resume state carries them on.
    The ranks deal a step's samples by the `configured` sizes, the same on every rank whatever
    a retry did to one rank's."""

    configured: int
    configured_tokens: int
    size: int
    tokens: int

    @classmethod
    def of(cls, micro_batch: int, micro_batch_tokens: int) -> MicroBatching:
        return cls(micro_batch, micro_batch_tokens, micro_batch, micro_batch_tokens)

    def halve(self) -> None:
        self.size = max(1, self.size // 2)
        self.tokens //= 2

    def restore(self, state: dict[str, Any], retries: int) -> None:
        """The sizes of a resume state (`retries`: the out-of-memory retries before it)."""
        self.size = int(state["micro_batch"])
        self.tokens = int(state.get("micro_batch_tokens", self.configured_tokens >> retries))
