"""Sequence packing: the texts of a micro-batch laid end to end in rows, so padding costs little.

Padded, every text of a micro-batch is as long as its longest: on the public corpus (256-token
Scruples posts beside 20-token GoEmotions comments) half the tokens of a random micro-batch of
64 are padding, and every layer computes them. Packed, the texts fill rows as wide as the
longest text, first fit by decreasing length, and the token-wise work (the projections, the
MLPs, the norms: nearly all the FLOPs) runs on the rows. Attention runs on the rows too where
FlashAttention's variable-length kernels run (redheart/model/varlen.py: each text a segment of
the flat token list, `segments`); elsewhere it goes back to the padded layout for its few
kernels (`unpack`, the usual key-padding mask, `pack`). Attention over packed rows with a
block-diagonal mask ran slower than padding on an H200 (245.6 against 338.3 samples/s,
micro-batch 64, eager; the dense mask the likely cause).
The network has no position embeddings (positions live in the frozen encoder's states), so
packed and padded passes agree to float rounding, and the texts of a step still mix in any
proportion (grouping steps by length would group them by source corpus here).

`index` maps each packed slot to a distinct position of the padded layout (pad slots to
distinct padding positions), so packing is one `index_select` and unpacking one `index_copy`
whose backward passes are plain gathers and scatters without collisions. Everything is planned
on the host from lengths the host knows, and reaches the device in one non-blocking copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def pack(x: torch.Tensor, index: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """(B, L, D) padded -> (rows, width, D) packed."""
    return x.reshape(-1, x.shape[-1]).index_select(0, index).view(rows, width, x.shape[-1])


def unpack(x: torch.Tensor, index: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """(rows, width, D) packed -> (B, L, D) padded; padding positions hold zeros or a pad
    slot's values (finite), for the caller to mask."""
    flat = x.reshape(-1, x.shape[-1])
    return flat.new_zeros(batch * length, flat.shape[-1]).index_copy(0, index, flat).view(batch, length, -1)


@dataclass
class Packing:
    """Where the texts of a micro-batch of B texts (padded width L) sit in `rows` rows of
    `width` = L slots."""

    index: torch.Tensor  # (rows*width,) distinct positions in the padded (B*L) layout
    batch: int
    rows: int
    width: int
    # with `segments`: int32 offsets of the segments of the flat slots (each text, and each
    # row's free tail), for variable-length attention within them
    cu: torch.Tensor | None = None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.width:
            raise ValueError(f"packing planned for texts padded to {self.width} tokens, got {x.shape[1]}")
        return pack(x, self.index, self.rows, self.width)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        return unpack(x, self.index, self.batch, self.width)


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


def plan(lengths: list[int], device: torch.device, width: int = 0, rows_multiple: int = 0,
         segments: bool = False) -> Packing | None:
    """The packing of texts with these lengths, padded to `width` (default: their maximum), or
    None where packing saves nothing (every row would hold one text: no padding to remove).
    With `rows_multiple` (CUDA graphs, which replay fixed shapes) the rows are made up with empty
    ones to a multiple of it, at most one row per text, and there is always a plan. With
    `segments`, the offsets of the texts and of the rows' free tails (`Packing.cu`)."""
    width = width or max(lengths)
    rows = first_fit(lengths, width)
    n_rows, lens = packed_rows(lengths, width, rows_multiple, rows), np.asarray(lengths)
    if not rows_multiple and n_rows == len(lengths):
        return None
    index = np.empty(n_rows * width, dtype=np.int64)
    filled = np.zeros(n_rows * width, dtype=bool)
    seg = [0]  # segment ends: each text, then the row's free tail (and each made-up row) whole
    for r in range(n_rows):
        at = r * width
        for i in rows[r] if r < len(rows) else ():
            index[at:at + lens[i]] = np.arange(i * width, i * width + lens[i])
            at += lens[i]
            seg.append(at)
        filled[r * width:at] = True
        if at < (r + 1) * width:
            seg.append((r + 1) * width)
    # a row's free slots (and the empty rows), in order, take distinct padding positions of the
    # padded layout: there are enough, as there are no more rows than texts
    padding = np.flatnonzero(np.arange(width)[None, :] >= lens[:, None])
    free = np.flatnonzero(~filled)
    index[free] = padding[:free.size]
    flat = torch.from_numpy(index)
    cu = torch.tensor(seg, dtype=torch.int32) if segments else None
    if device.type == "cuda":  # host-to-device copies, not waited for
        flat = flat.pin_memory().to(device, non_blocking=True)
        cu = cu.pin_memory().to(device, non_blocking=True) if cu is not None else None
    return Packing(flat, len(lengths), n_rows, width, cu)


def packed_rows(lengths: list[int], width: int, rows_multiple: int = 0, rows: list[list[int]] | None = None) -> int:
    """How many rows of `width` the texts are packed into (`plan`): first fit, made up to a
    multiple of `rows_multiple` (at most one row per text)."""
    n = len(rows if rows is not None else first_fit(lengths, width))
    return min(len(lengths), -(-n // rows_multiple) * rows_multiple) if rows_multiple else n


def padded_fraction(lengths: list[int]) -> tuple[int, int, int]:
    """(real tokens, padded tokens, packed tokens) of one micro-batch: what packing saves."""
    width = max(lengths)
    return sum(lengths), len(lengths) * width, len(first_fit(lengths, width)) * width
