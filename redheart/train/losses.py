"""Masked multi-task losses, label smoothing and the R-Drop consistency term, as pure functions.

Every head's loss is a *sum* over its labelled items divided by a count given from outside:
the number of labelled items in the whole optimizer step. The step's gradient is then the
same however the step is cut into micro-batches (or shared between GPUs). A head with no
labelled item in the step contributes nothing, so it receives no gradient.

Bentham and regret come as logits (redheart/model/network.py). Their loss is by default the
binary cross-entropy of the sigmoid against the target value (`tech.value_loss=bce`): its
gradient at the logit is sigmoid(z) - y, which never vanishes. A squared error on the sigmoid
(`mse`) has the gradient 2 (p - y) p (1 - p): once a large update pushes a head's logits far
out, p (1 - p) is ~0 for every text and the head stays at a constant forever (the regret head
of a 4-epoch full-corpus run did exactly that, issue 24). Both have their minimum at p = y.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from redheart.config import HEADS


def smooth(target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing of a soft target: (1 - e) * t + e / K."""
    if smoothing == 0.0:
        return target
    return target * (1.0 - smoothing) + smoothing / target.shape[-1]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample cross-entropy against a soft target, from logits (never from probabilities)."""
    return -(smooth(target, smoothing) * F.log_softmax(logits.float(), dim=-1)).sum(-1)


def value_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Element-wise loss of a [0, 1] head from its logits: `bce` (binary cross-entropy against
    the soft target) or `mse` (squared error of the sigmoid)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (torch.sigmoid(logits.float()) - target).pow(2)


def per_item_losses(out: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor],
                    smoothing: float, smooth_surd: bool, values: str = "bce") -> dict[str, torch.Tensor]:
    """Unreduced, masked losses of the heads in `out` (logits): emotion/regret/surd per sample,
    bentham per element; regret and Bentham times the record's `weight` where the targets have
    one (`redheart.data.dataset.vote_weights`)."""
    loss = {
        "emotion": lambda o, t: soft_cross_entropy(o, t, smoothing),
        "bentham": lambda o, t: value_loss(o, t, values),
        "regret": lambda o, t: value_loss(o, t, values),
        "surd": lambda o, t: soft_cross_entropy(o, t, smoothing if smooth_surd else 0.0),
    }
    items = {h: loss[h](out[h], tgt[h]) for h in HEADS if h in out}
    weight = tgt.get("weight")
    if weight is not None:
        for h in ("bentham", "regret"):
            if h in items:
                items[h] = items[h] * (weight[:, None] if items[h].dim() > 1 else weight)
    return {h: masked(v, tgt[f"{h}_mask"]) for h, v in items.items()}


def masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero where the mask is off, by selection (a non-finite value there cannot leak as NaN * 0)."""
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def _normalisers(counts: dict[str, int] | torch.Tensor) -> dict[str, float | torch.Tensor]:
    """Per head: 1 / labelled count. From a dict of ints (heads with 0 labelled items are left
    out, so they get no gradient at all), or from a tensor of inverse counts in HEADS order
    (0 for an unlabelled head: every head is computed, shapes and control flow are fixed, as
    a CUDA graph needs). Heads whose outputs were not computed are skipped by the callers."""
    if isinstance(counts, torch.Tensor):
        return {h: counts[i] for i, h in enumerate(HEADS)}
    return {h: 1.0 / counts[h] for h in HEADS if counts[h] > 0}


def task_loss(out: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor], counts: dict[str, int] | torch.Tensor,
              weights: dict[str, float], smoothing: float = 0.0, smooth_surd: bool = True, values: str = "bce"
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the head losses, each normalised by its labelled count in the step."""
    items = per_item_losses(out, tgt, smoothing, smooth_surd, values)
    parts = {h: items[h].sum() * inv for h, inv in _normalisers(counts).items() if h in items}
    total = sum((weights[h] * parts[h] for h in parts), torch.zeros((), device=_device(out)))
    return total, parts


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-sample 0.5 * (KL(p_a || p_b) + KL(p_b || p_a))."""
    la, lb = F.log_softmax(logits_a.float(), -1), F.log_softmax(logits_b.float(), -1)
    return 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1))


def rdrop_consistency(out_a: dict[str, torch.Tensor], out_b: dict[str, torch.Tensor],
                      tgt: dict[str, torch.Tensor], counts: dict[str, int] | torch.Tensor) -> torch.Tensor:
    """R-Drop's term between two dropout passes (logits): symmetric KL for the distributions,
    squared difference of the [0, 1] values, masked and normalised like the task losses."""
    def values(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(a.float()) - torch.sigmoid(b.float())).pow(2)

    term = {"emotion": symmetric_kl, "bentham": values, "regret": values, "surd": symmetric_kl}
    items = {h: masked(term[h](out_a[h], out_b[h]), tgt[f"{h}_mask"]) for h in HEADS if h in out_a}
    return sum((items[h].sum() * inv for h, inv in _normalisers(counts).items() if h in items),
               torch.zeros((), device=_device(out_a)))


def _device(out: dict[str, torch.Tensor]) -> torch.device:
    return next(iter(out.values())).device
