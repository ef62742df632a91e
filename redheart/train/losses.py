"""Masked multi-task losses, label smoothing and the R-Drop consistency term, as pure functions.

Every head's loss is a *sum* over its labelled items divided by a count given from outside:
the number of labelled items in the whole optimizer step. The step's gradient is then the
same however the step is cut into micro-batches (or shared between GPUs). A head with no
labelled item in the step contributes nothing, so it receives no gradient.

Each head's own loss is the function its entry in the table of heads points to
(redheart/heads.py). The `values` heads (Bentham, regret) come as logits
(redheart/model/network.py); their loss is by default the binary cross-entropy of the sigmoid
against the target value (`tech.value_loss=bce`): its gradient at the logit is sigmoid(z) - y,
which never vanishes. A squared error on the sigmoid
(`mse`) has the gradient 2 (p - y) p (1 - p): once a large update pushes a head's logits far
out, p (1 - p) is ~0 for every text and the head stays at a constant forever (the regret head
of a 4-epoch full-corpus run did exactly that, issue 24). Both have their minimum at p = y.
"""
from __future__ import annotations

import torch

from redheart import heads
# The heads' own loss functions live in the table's module (redheart/heads.py); imported here
# too, where the tests and benches have always found them.
from redheart.heads import LossOptions, smooth, soft_cross_entropy, symmetric_kl, value_loss  # noqa: F401


def per_item_losses(out: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor],
                    smoothing: float, smooth_surd: bool, values: str = "bce") -> dict[str, torch.Tensor]:
    """Unreduced, masked losses of the heads in `out` (logits), each head's `loss` (per sample,
    or per element for a `values` head); times the record's `weight` for the heads weighed by
    votes, where the targets have one (`redheart.data.dataset.vote_weights`)."""
    opts = LossOptions(smoothing, smooth_surd, values)
    items = {h.name: h.loss(out[h.name], tgt[h.name], opts) for h in heads.HEADS if h.name in out}
    weight = tgt.get("weight")
    if weight is not None:
        for h in heads.HEADS:
            if h.vote_weighted and h.name in items:
                v = items[h.name]
                items[h.name] = v * (weight[:, None] if v.dim() > 1 else weight)
    return {h: masked(v, tgt[f"{h}_mask"]) for h, v in items.items()}


def masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero where the mask is off, by selection (a non-finite value there cannot leak as NaN * 0)."""
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _normalisers(counts: dict[str, int] | torch.Tensor) -> dict[str, float | torch.Tensor]:
    """Per head: 1 / labelled count. From a dict of ints (heads with 0 labelled items are left
    out, so they get no gradient at all), or from a tensor of inverse counts in table order
    (0 for an unlabelled head: every head is computed, shapes and control flow are fixed, as
    a CUDA graph needs). Heads whose outputs were not computed are skipped by the callers."""
    if isinstance(counts, torch.Tensor):
        return {h: counts[i] for i, h in enumerate(heads.names())}
    return {h: 1.0 / counts[h] for h in heads.names() if counts[h] > 0}


def task_loss(out: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor], counts: dict[str, int] | torch.Tensor,
              weights: dict[str, float], smoothing: float = 0.0, smooth_surd: bool = True, values: str = "bce"
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the head losses, each normalised by its labelled count in the step."""
    items = per_item_losses(out, tgt, smoothing, smooth_surd, values)
    parts = {h: items[h].sum() * inv for h, inv in _normalisers(counts).items() if h in items}
    total = sum((weights[h] * parts[h] for h in parts), torch.zeros((), device=_device(out)))
    return total, parts


def rdrop_consistency(out_a: dict[str, torch.Tensor], out_b: dict[str, torch.Tensor],
                      tgt: dict[str, torch.Tensor], counts: dict[str, int] | torch.Tensor) -> torch.Tensor:
    """R-Drop's term between two dropout passes (logits), each head's `consistency` (symmetric
    KL for the distributions, squared difference of the [0, 1] values), masked and normalised
    like the task losses."""
    items = {h.name: masked(h.consistency(out_a[h.name], out_b[h.name]), tgt[f"{h.name}_mask"])
             for h in heads.HEADS if h.name in out_a}
    return sum((items[h].sum() * inv for h, inv in _normalisers(counts).items() if h in items),
               torch.zeros((), device=_device(out_a)))


def _device(out: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(out.values())).device
