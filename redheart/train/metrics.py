"""Per-head validation metrics from predictions and masked targets (pure, on CPU tensors).

Each head's metrics are the function its entry in the table of heads points to
(redheart/heads.py): emotion: loss (cross-entropy, no smoothing), accuracy and macro-F1
against the argmax of the soft target, and the expected calibration error of its shares;
bentham and regret: loss (MSE), MAE and Pearson r over labelled items; surd: loss
(cross-entropy) and MAE of the shares. `loss` is the weighted sum of the head losses over the
heads that have targets, the number every later step compares.
"""
from __future__ import annotations

import math

import torch

from redheart import heads
# The heads' own metric functions live in the table's module; imported here too, where the
# tests and the analysis have always found them.
from redheart.heads import expected_calibration_error, macro_f1, pearson  # noqa: F401


def head_metrics(pred: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor],
                 weights: dict[str, float]) -> dict[str, float]:
    """Metrics of a whole split. `pred` holds each head's `Head.prediction` (the distributions'
    logits, the [0, 1] values): `{head}_{score}` for every head with targets, then
    `{head}_loss`, then the combined `loss`."""
    m: dict[str, float] = {}
    losses: dict[str, float] = {}
    for h in heads.HEADS:
        mask = tgt[f"{h.name}_mask"]
        if mask.any():
            found = h.metrics(pred[h.name].float()[mask], tgt[h.name][mask])
            losses[h.name] = found.pop("loss")
            m.update({f"{h.name}_{k}": v for k, v in found.items()})
    for h in losses:
        m[f"{h}_loss"] = losses[h]
    m["loss"] = sum(weights[h] * losses[h] for h in losses) if losses else float("nan")
    return m


# A head's predictions count as collapsed below this spread across a split's texts (std of a
# [0, 1] value, or of each class's share), or when this share of them sits within SATURATED of
# 0 or 1 (a sigmoid pushed so far out that its gradient vanishes). A working head varies by
# orders of magnitude more: the tiny preset after one epoch on the sample data ~1e-2.
CONSTANT_STD = 1e-4
SATURATED = 1e-4
SATURATED_SHARE = 0.99


def collapsed_heads(pred: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor]) -> dict[str, str]:
    """The heads whose predictions on a split have collapsed, each with the reason: non-finite
    outputs, the same output for every text, or a saturated sigmoid. `pred` as `head_metrics`
    takes it; only heads with at least two labelled items are judged."""
    out: dict[str, str] = {}
    for head in heads.HEADS:
        h = head.name
        mask = tgt[f"{h}_mask"]
        rows = mask.any(-1) if mask.dim() > 1 else mask
        if h not in pred or int(rows.sum()) < 2:
            continue
        p = pred[h][rows].float()
        if head.kind != "values":
            p = torch.softmax(p, -1)
        if not torch.isfinite(p).all():
            out[h] = f"non-finite outputs for {int((~torch.isfinite(p)).view(len(p), -1).any(-1).sum())} of {len(p)} texts"
            continue
        spread = float(p.std(0).max()) if p.dim() > 1 else float(p.std())
        if spread < CONSTANT_STD:
            mean = p.mean(0)
            shown = (f"{float(mean):.4f}" if mean.dim() == 0
                     else "[" + ", ".join(f"{float(v):.3f}" for v in mean.flatten()) + "]")
            out[h] = f"the same output for all {len(p)} texts ({shown}, std {spread:.1e})"
            continue
        if head.kind == "values":
            values = pred[h][mask].float()
            share = float(((values < SATURATED) | (values > 1 - SATURATED)).float().mean())
            if share >= SATURATED_SHARE:
                out[h] = f"saturated: {share:.0%} of its outputs within {SATURATED:g} of 0 or 1 (no gradient there)"
    return out


def fit_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The temperature T that minimises the cross-entropy of softmax(logits / T) against the
    (soft) targets: one parameter, fitted on validation (temperature scaling, Guo et al. 2017).
    A golden-section search over log T in [1/20, 20] (the loss is convex in 1/T)."""
    logits, target = logits.double(), target.double()

    def nll(log_t: float) -> float:
        return float(-(target * torch.log_softmax(logits / math.exp(log_t), -1)).sum(-1).mean())

    lo, hi = math.log(1 / 20), math.log(20)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)
