"""Token states of the frozen encoder for the samples of a micro-batch.

The encoder never trains, so its output for a text never changes: with the cache on, each
split is encoded once (in a fixed order, so results are reproducible) and every epoch, the
LR sweep and R-Drop's second pass reuse it. Without the cache the encoder runs per batch.
"""
from __future__ import annotations

import logging

import torch

from redheart.data.dataset import Batch, TaskData, collate
from redheart.model.encoder import Encoder

log = logging.getLogger("redheart")


def cache_bytes(data: TaskData, dim: int, dtype: torch.dtype) -> int:
    return int(data.lengths.sum()) * dim * torch.tensor([], dtype=dtype).element_size()


def to_device(values: list[int] | list[float], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small host list on the device without blocking the host (through pinned memory)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


class FeatureSource:
    """Token states and targets of one split.

    Cached: all token states sit in one flat (tokens, D) tensor on the device, with each
    sample's offset and length, and all targets on the device too; a micro-batch is then
    gathered with device indices, with no host round trip (the host never waits for the GPU).
    """

    def __init__(self, encoder: Encoder, data: TaskData, device: torch.device, dtype: torch.dtype,
                 pad_id: int, cache: bool, encode_batch: int = 64):
        self.encoder, self.data, self.device, self.dtype = encoder, data, device, dtype
        self.pad_id = pad_id
        self.flat: torch.Tensor | None = None
        n = len(data)
        self.lengths = data.lengths.to(device)
        self.targets = {k: v.to(device) for k, v in data.targets(torch.arange(n)).items()}
        if cache and n > 0:
            self.flat, self.offsets = self._build_cache(encode_batch)
            self._arange = torch.arange(int(data.lengths.max()), device=device)

    @property
    def cached(self) -> bool:
        return self.flat is not None

    def _encode(self, batch: Batch) -> torch.Tensor:
        ids = batch.input_ids.to(self.device, non_blocking=True)
        keep = batch.keep.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.encoder(ids, keep).to(self.dtype)

    def _build_cache(self, encode_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = self.data.lengths
        offsets = torch.cumsum(lengths, 0) - lengths
        self._offsets_host = offsets
        flat = torch.empty(int(lengths.sum()), self.encoder.dim, dtype=self.dtype, device=self.device)
        order = sorted(range(len(self.data)), key=lambda i: (-int(lengths[i]), i))
        for s in range(0, len(order), encode_batch):
            idx = order[s:s + encode_batch]
            states = self._encode(collate(self.data, idx, self.pad_id))
            for row, i in enumerate(idx):
                o, n = int(offsets[i]), int(lengths[i])
                flat[o:o + n] = states[row, :n]
        return flat, offsets.to(self.device)

    def sample(self, i: int) -> torch.Tensor:
        """The cached token states (L, D) of sample i."""
        o = int(self._offsets_host[i])
        return self.flat[o:o + int(self.data.lengths[i])]

    def gather(self, idx: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(states (B, width, D) zero-padded, keep (B, width)) for device indices `idx`."""
        ar = self._arange[:width]
        keep = ar[None, :] < self.lengths[idx][:, None]
        pos = torch.where(keep, self.offsets[idx][:, None] + ar[None, :], 0)
        states = self.flat[pos] * keep[..., None].to(self.flat.dtype)
        return states, keep

    def targets_of(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in self.targets.items()}

    def __call__(self, idx: list[int]) -> tuple[torch.Tensor, Batch]:
        """(token states (B, L, D) on the device, the collated batch with targets)."""
        batch = collate(self.data, idx, self.pad_id)
        if self.flat is None:
            return self._encode(batch), batch
        states, _ = self.gather(to_device(idx, self.device, torch.long), batch.keep.shape[1])
        return states, batch
