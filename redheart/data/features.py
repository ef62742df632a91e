"""Token states of the frozen encoder for the samples of a micro-batch.

The encoder never trains, so its output for a text never changes: with the cache on, each
split is encoded once (in a fixed order, so results are reproducible) and every epoch, the
LR sweep and R-Drop's second pass reuse it. Without the cache the encoder runs per batch.
"""
from __future__ import annotations

import logging

import torch
from torch.nn.utils.rnn import pad_sequence

from redheart.data.dataset import Batch, TaskData, collate
from redheart.model.encoder import Encoder

log = logging.getLogger("redheart")


def cache_bytes(data: TaskData, dim: int, dtype: torch.dtype) -> int:
    return int(data.lengths.sum()) * dim * torch.tensor([], dtype=dtype).element_size()


class FeatureSource:
    def __init__(self, encoder: Encoder, data: TaskData, device: torch.device, dtype: torch.dtype,
                 pad_id: int, cache: bool, encode_batch: int = 64):
        self.encoder, self.data, self.device, self.dtype = encoder, data, device, dtype
        self.pad_id = pad_id
        self.cached: list[torch.Tensor] | None = None
        if cache and len(data) > 0:
            self.cached = self._build_cache(encode_batch)

    def _encode(self, batch: Batch) -> torch.Tensor:
        ids = batch.input_ids.to(self.device, non_blocking=True)
        keep = batch.keep.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.encoder(ids, keep).to(self.dtype)

    def _build_cache(self, encode_batch: int) -> list[torch.Tensor]:
        order = sorted(range(len(self.data)), key=lambda i: (-int(self.data.lengths[i]), i))
        out: list[torch.Tensor | None] = [None] * len(self.data)
        for s in range(0, len(order), encode_batch):
            idx = order[s:s + encode_batch]
            states = self._encode(collate(self.data, idx, self.pad_id))
            for row, i in enumerate(idx):
                out[i] = states[row, : len(self.data.token_ids[i])].clone()
        return out  # type: ignore[return-value]

    def __call__(self, idx: list[int]) -> tuple[torch.Tensor, Batch]:
        """(token states (B, L, D) on the device, the collated batch with targets)."""
        batch = collate(self.data, idx, self.pad_id)
        if self.cached is None:
            return self._encode(batch), batch
        states = pad_sequence([self.cached[i] for i in idx], batch_first=True)
        return states.to(self.device, non_blocking=True), batch
