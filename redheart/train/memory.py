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


def estimate(cfg: Config, params: int, micro_batch: int | None = None, tokens: int | None = None) -> dict[str, Any]:
    """Estimated training memory (GiB) of a config with `params` trainable parameters.

    Weights, gradients and the two AdamW moments in fp32 (16 bytes a parameter), the EMA copy
    (4 bytes, unless it lives in CPU memory), the bf16 weight copies of `train.bf16_weights`
    (2 bytes; the GPU path with bf16 autocast), and activations: per token and layer about
    `34 * hidden` bytes in bf16 plus the attention scores (Korthikanti et al., 2022), doubled
    by R-Drop's second pass, for the micro-batch at the full token length.
    """
    m, t = cfg.model, cfg.train
    mb = micro_batch or t.micro_batch
    seq = tokens or m.max_tokens
    layers = m.layers + 4 * m.tower_layers
    weights = params * 4
    grads = params * 4
    optimizer = params * 8
    ema = params * 4 if cfg.tech.ema_decay > 0 and cfg.tech.ema_device == "same" else 0
    copies = params * 2 if t.bf16_weights != "off" and t.precision in ("auto", "bf16") and t.grad_accum > 1 else 0
    passes = 2 if cfg.tech.rdrop_alpha > 0 else 1
    per_layer = seq * m.hidden * 34 + 5 * m.heads * seq * seq
    if m.activation_checkpointing:
        per_layer = seq * m.hidden * 2 + per_layer / max(layers, 1)
    activations = mb * passes * layers * per_layer
    encoder = 23e6 * 2  # the frozen MiniLM encoder in bf16
    total = weights + grads + optimizer + ema + copies + activations + encoder
    return {
        "weights_gib": weights / GIB, "gradients_gib": grads / GIB, "optimizer_gib": optimizer / GIB,
        "ema_gib": ema / GIB, "weight_copies_gib": copies / GIB, "activations_gib": activations / GIB, "encoder_gib": encoder / GIB,
        "total_gib": total / GIB, "micro_batch": mb, "tokens": seq,
    }
