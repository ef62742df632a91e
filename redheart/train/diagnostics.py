"""How the heads share the backbone: the gradient each head's loss sends into the backbone's
weights, for one batch.

The backbone is trained by the sum of the heads' weighted losses; a head whose gradient there
is a small share of the total (or points against the others') shapes the shared features
little. `head_gradients` gives each head's gradient norm at the backbone's weights and the
cosine between every two heads' gradients; bench/head_gradients.py averages them over batches
of a checkpoint (or of the initial weights).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from redheart.config import TechniqueConfig
from redheart.train.losses import task_loss


def head_gradients(model: nn.Module, states: torch.Tensor, keep: torch.Tensor, tgt: dict[str, torch.Tensor],
                   counts: dict[str, int], weights: dict[str, float], tech: TechniqueConfig,
                   dtype: torch.dtype | None = None) -> dict[str, dict]:
    """{"norm": {head: |d(w_h L_h)/d backbone|}, "share": {head: norm / sum of norms},
    "cosine": {"a/b": cosine of the two heads' gradients}} for the heads with targets in the
    batch. L_h is the head's training loss (as `task_loss` normalises it), without dropout
    (the model is put in eval mode: the same function every time, no random numbers drawn)."""
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(states.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(states, keep, bool((~keep).any()))
            _, parts = task_loss(out, tgt, counts, weights, tech.label_smoothing, tech.smooth_surd, tech.value_loss)
        params = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
        grads: dict[str, list[torch.Tensor]] = {}
        for h, part in parts.items():
            g = torch.autograd.grad(weights[h] * part, params, retain_graph=True, allow_unused=True)
            grads[h] = [torch.zeros_like(p) if x is None else x.float() for x, p in zip(g, params)]
    finally:
        model.train(was_training)
    norm = {h: math.sqrt(sum(float((x * x).sum()) for x in g)) for h, g in grads.items()}
    total = sum(norm.values())
    heads = list(grads)
    cosine = {}
    for i, a in enumerate(heads):
        for b in heads[i + 1:]:
            dot = sum(float((x * y).sum()) for x, y in zip(grads[a], grads[b]))
            cosine[f"{a}/{b}"] = dot / (norm[a] * norm[b]) if norm[a] and norm[b] else float("nan")
    return {"norm": norm, "share": {h: n / total if total else float("nan") for h, n in norm.items()},
            "cosine": cosine}
