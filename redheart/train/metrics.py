"""Per-head validation metrics from predictions and masked targets (pure, on CPU tensors).

emotion: loss (cross-entropy, no smoothing), accuracy and macro-F1 against the argmax of the
soft target, and the expected calibration error of its shares; bentham and regret: loss (MSE), MAE and Pearson r over labelled items; surd:
loss (cross-entropy) and MAE of the shares. `loss` is the weighted sum of the head losses
over the heads that have targets, the number every later step compares.
"""
from __future__ import annotations

import math

import torch

from redheart.config import HEADS
from redheart.train.losses import soft_cross_entropy


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, classes: int) -> float:
    """Macro-F1 over the classes that occur in the gold labels or the predictions."""
    f1s = []
    for c in range(classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else float("nan")


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2:
        return float("nan")
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def head_metrics(pred: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor],
                 weights: dict[str, float]) -> dict[str, float]:
    """Metrics of a whole split. `pred` holds emotion/surd logits and bentham/regret values."""
    m: dict[str, float] = {}
    losses: dict[str, float] = {}
    em = tgt["emotion_mask"]
    if em.any():
        logits, target = pred["emotion"][em].float(), tgt["emotion"][em]
        losses["emotion"] = float(soft_cross_entropy(logits, target).mean())
        p, g = logits.argmax(-1), target.argmax(-1)
        m["emotion_acc"] = float((p == g).float().mean())
        m["emotion_f1"] = macro_f1(p, g, logits.shape[-1])
        m["emotion_ece"] = expected_calibration_error(logits, target)
    bm = tgt["bentham_mask"]
    if bm.any():
        pb, tb = pred["bentham"].float()[bm], tgt["bentham"][bm]
        losses["bentham"] = float((pb - tb).pow(2).mean())
        m["bentham_mae"] = float((pb - tb).abs().mean())
        m["bentham_r"] = pearson(pb, tb)
    rm = tgt["regret_mask"]
    if rm.any():
        pr, tr = pred["regret"].float()[rm], tgt["regret"][rm]
        losses["regret"] = float((pr - tr).pow(2).mean())
        m["regret_mae"] = float((pr - tr).abs().mean())
        m["regret_r"] = pearson(pr, tr)
    sm = tgt["surd_mask"]
    if sm.any():
        logits, target = pred["surd"][sm].float(), tgt["surd"][sm]
        losses["surd"] = float(soft_cross_entropy(logits, target).mean())
        m["surd_mae"] = float((torch.softmax(logits, -1) - target).abs().mean())
    for h in HEADS:
        if h in losses:
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
    for h in HEADS:
        mask = tgt[f"{h}_mask"]
        rows = mask.any(-1) if mask.dim() > 1 else mask
        if h not in pred or int(rows.sum()) < 2:
            continue
        p = pred[h][rows].float()
        if h in ("emotion", "surd"):
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
        if h in ("bentham", "regret"):
            values = pred[h][mask].float()
            share = float(((values < SATURATED) | (values > 1 - SATURATED)).float().mean())
            if share >= SATURATED_SHARE:
                out[h] = f"saturated: {share:.0%} of its outputs within {SATURATED:g} of 0 or 1 (no gradient there)"
    return out


def expected_calibration_error(logits: torch.Tensor, target: torch.Tensor, bins: int = 15,
                               temperature: float = 1.0) -> float:
    """ECE of a softmax head (Guo et al., 2017): the texts binned by their top predicted share,
    each bin's |accuracy - mean top share| weighted by its size; a prediction is right when its
    argmax is the argmax of the (soft) target."""
    p = torch.softmax(logits.double() / temperature, -1)
    conf, pred = p.max(-1)
    right = (pred == target.argmax(-1)).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += float(inside.double().mean()) * abs(float(right[inside].mean() - conf[inside].mean()))
    return ece


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
