"""Sequence packing: the texts of a micro-batch laid end to end in rows, so padding costs little.

Padded, every text of a micro-batch is as long as its longest: on the public corpus (256-token
Scruples posts beside 20-token GoEmotions comments) half the tokens of a random micro-batch of
64 are padding, and every layer computes them. Packed, the texts fill rows as wide as the
longest text, first fit by decreasing length; attention is block-diagonal (a token attends only
to its own text's tokens), and each text's tokens are gathered back before the towers' pooling.
The network has no position embeddings (positions live in the frozen encoder's states), so a
text's outputs do not depend on where it sits in a row: packed and padded passes agree to
float rounding, and the texts of a step still mix in any proportion (grouping steps by length
would instead group them by source corpus here).

Everything is planned on the host from the lengths the host already knows, and reaches the
device in one non-blocking copy: packing adds no synchronisation to the step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Packing:
    """Where the texts of a micro-batch of B texts (padded width L) sit in R rows of W slots."""

    index: torch.Tensor  # (R*W,) for each slot, its position in the padded (B*L) input (pad slots: 0)
    mask: torch.Tensor  # (R, 1, W, W) bool: slot i may attend to slot j (same text; a pad slot to itself)
    slots: torch.Tensor  # (B, L) for each text's token, its slot in the packed (R*W) layout (padding: 0)
    rows: int
    width: int

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) padded -> (R, W, D) packed."""
        if x.shape[1] != self.width:
            raise ValueError(f"packing planned for texts padded to {self.width} tokens, got {x.shape[1]}")
        return x.reshape(-1, x.shape[-1])[self.index].view(self.rows, self.width, x.shape[-1])

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(R, W, H) packed -> (B, L, H) padded; the padding positions hold some slot's values
        (finite), to be masked by the caller."""
        return x.reshape(-1, x.shape[-1])[self.slots]


def first_fit(lengths: list[int], width: int) -> list[list[int]]:
    """Rows of text indices, each row's lengths summing to at most `width`: first fit by
    decreasing length (ties by index, so the plan is a pure function of the lengths)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(width - n)
    return rows


def plan(lengths: list[int], device: torch.device) -> Packing | None:
    """The packing of texts with these lengths (padded to their maximum), or None where packing
    saves nothing (every row would hold one text: no padding to remove)."""
    width = max(lengths)
    rows = first_fit(lengths, width)
    if len(rows) == len(lengths):
        return None
    n_rows = len(rows)
    index = np.zeros(n_rows * width, dtype=np.int64)
    seg = -1 - np.arange(n_rows * width, dtype=np.int64)  # pad slots: a segment of their own
    slots = np.zeros((len(lengths), width), dtype=np.int64)
    for r, texts in enumerate(rows):
        at = r * width
        for i in texts:
            n = lengths[i]
            index[at:at + n] = np.arange(i * width, i * width + n)
            seg[at:at + n] = i
            slots[i, :n] = np.arange(at, at + n)
            at += n
    flat = torch.from_numpy(np.concatenate([index, seg, slots.reshape(-1)]))
    if device.type == "cuda":  # one host-to-device copy for the whole plan, not waited for
        flat = flat.pin_memory().to(device, non_blocking=True)
    index_d, seg_d, slots_d = flat.split([index.size, seg.size, slots.size])
    seg_d = seg_d.view(n_rows, width)
    mask = (seg_d[:, :, None] == seg_d[:, None, :]).unsqueeze(1)
    return Packing(index_d, mask, slots_d.view(len(lengths), width), n_rows, width)


def padded_fraction(lengths: list[int]) -> tuple[int, int, int]:
    """(real tokens, padded tokens, packed tokens) of one micro-batch: what packing saves."""
    width = max(lengths)
    return sum(lengths), len(lengths) * width, len(first_fit(lengths, width)) * width
