"""Memory readings (GPU allocator, or process RSS without a GPU) and the estimate of a
preset's training memory before anything is allocated."""
from __future__ import annotations

import time
from typing import Any

import psutil
import torch

from redheart.config import Config

GIB = 2**30


def sample(device: torch.device) -> dict[str, float]:
    """One reading in GiB: allocated/reserved/peak on a GPU, plus the process RSS."""
    out = {"t": time.time(), "rss_gib": psutil.Process().memory_info().rss / GIB}
    if device.type == "cuda":
        out.update(
            allocated_gib=torch.cuda.memory_allocated(device) / GIB,
            reserved_gib=torch.cuda.memory_reserved(device) / GIB,
            peak_gib=torch.cuda.max_memory_allocated(device) / GIB,
        )
    return out


def device_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / GIB


# Activations a Transformer layer keeps for its backward, in bytes per token per unit of the
# hidden width, under bf16 autocast: the layer norms' fp32 inputs (2 x 4), the bf16 inputs of
# the four matrix products (2 + 2 + 2 + 8), q, k, v and the attention output (8), the GELU's
# input (8), the dropout masks (1 + 4 + 1) and outputs kept as the next product's input (8):
# ~52 eager, as counted (not yet measured). Compiled layers keep less (Inductor recomputes cheap
# element-wise results): two measured peaks imply 36.1 (the full-corpus run, 2026-12-08) and
# 48.3 (every text 256 tokens, 2026-11-29); 42 puts the estimate within 11% of both
# (bench/RESULTS.md, "Memory estimate").
LAYER_BYTES = {"eager": 52.0, "compiled": 42.0}
# What one layer's backward allocates while it runs (the gradients of its activations), and the
# fixed workspaces (cuBLAS, the attention kernels, allocator rounding), at the peak.
BACKWARD_BYTES = 24.0
WORKSPACE_GIB = 1.0
# A packed micro-batch's tokens are a sum of random lengths: its heaviest is taken this many
# standard deviations above the mean (over a 60-epoch run of the public corpus's 46,831
# training texts at micro-batch 64, about 44,000 micro-batches: 1 in ~300,000 is heavier).
HEAVY_SIGMAS = 4.5


def heaviest_micro_batch(lengths: list[int] | None, micro_batch: int, max_tokens: int, packed: bool) -> int:
    """Tokens the token-wise layers process in the heaviest micro-batch a run meets (one pass,
    before R-Drop's doubling): padded, `micro_batch` rows as wide as the longest text; packed,
    the micro-batch's summed length `HEAVY_SIGMAS` above its mean (never above the padded
    figure), in whole rows of the longest text. Without lengths every text is `max_tokens` long."""
    if not lengths:
        return micro_batch * max_tokens
    lens = [min(int(n), max_tokens) for n in lengths]
    width = max(lens)
    padded = micro_batch * width
    if not packed:
        return padded
    n = len(lens)
    mean = sum(lens) / n
    std = (sum((x - mean) ** 2 for x in lens) / n) ** 0.5
    heavy = micro_batch * mean + HEAVY_SIGMAS * std * micro_batch ** 0.5
    return min(padded, -(-int(heavy) // width) * width)


def estimate(cfg: Config, params: int, micro_batch: int | None = None, tokens: int | None = None,
             lengths: list[int] | None = None, heads: int = 4, cache_bytes: int = 0) -> dict[str, Any]:
    """Estimated peak GPU memory (GiB) of training `cfg` with `params` trainable parameters.

    Static: fp32 weights and gradients (8 bytes a parameter), the two AdamW moments (8, in CPU
    memory under the swap manager), the EMA (4, unless in CPU memory), the bf16 weight copies
    of `train.bf16_weights` (2), the frozen encoder and its cached token states (`cache_bytes`).
    Activations: the tokens of the heaviest micro-batch (`heaviest_micro_batch` from the
    training texts' `lengths`, or `tokens`; doubled by R-Drop) times the layers that run (the
    backbone's and those of the `heads` towers with targets) times `LAYER_BYTES` x hidden; with
    activation checkpointing only each layer's input is kept and one layer is recomputed at a
    time. Plus one layer's backward buffers and fixed workspaces.
    """
    m, t = cfg.model, cfg.train
    mb = micro_batch or t.micro_batch
    accum = t.grad_accum if micro_batch is None else max(1, cfg.effective_batch // mb)
    swap = cfg.memory.swap == "on"
    packed = t.packing == "on" or (t.packing == "auto" and mb > 8)
    if tokens is None:
        tokens = heaviest_micro_batch(lengths, mb, m.max_tokens, packed)
    tokens *= 2 if cfg.tech.rdrop_alpha > 0 else 1
    layers = m.layers + heads * m.tower_layers
    weights = params * 4
    grads = params * 4
    optimizer = 0 if swap else params * 8
    ema = params * 4 if cfg.tech.ema_decay > 0 and cfg.tech.ema_device == "same" and not swap else 0
    copies = params * 2 if (t.bf16_weights == "on" or (t.bf16_weights == "auto" and accum > 1 and not t.compile
                                                       and not swap)) and t.precision in ("auto", "bf16") else 0
    per_layer = tokens * m.hidden * LAYER_BYTES["compiled" if t.compile else "eager"]
    if m.activation_checkpointing:
        activations = layers * tokens * m.hidden * 2 + per_layer
    else:
        activations = layers * per_layer
    backward = tokens * m.hidden * BACKWARD_BYTES * m.ffn_mult / 4
    encoder = 23e6 * 2 + cache_bytes  # the frozen MiniLM encoder in bf16, and its cached states
    workspace = WORKSPACE_GIB * GIB
    total = weights + grads + optimizer + ema + copies + activations + backward + encoder + workspace
    return {
        "weights_gib": weights / GIB, "gradients_gib": grads / GIB, "optimizer_gib": optimizer / GIB,
        "ema_gib": ema / GIB, "weight_copies_gib": copies / GIB, "activations_gib": (activations + backward) / GIB,
        "encoder_gib": encoder / GIB, "workspace_gib": workspace / GIB,
        "total_gib": total / GIB, "micro_batch": mb, "tokens": tokens, "layers": layers,
    }


def data_profile(train_lengths: list[int], head_counts: dict[str, int], cache_bytes: int = 0) -> dict[str, Any]:
    """What `estimate` needs to know of a run's data: its training texts' token lengths, how many
    towers have targets (a head without any never runs its tower in training), the encoder cache."""
    return {"lengths": [int(n) for n in train_lengths], "heads": max(1, sum(1 for c in head_counts.values() if c > 0)),
            "cache_bytes": int(cache_bytes)}
