"""Per-head validation metrics from predictions and masked targets (pure, on CPU tensors).

emotion: loss (cross-entropy, no smoothing), accuracy and macro-F1 against the argmax of the
soft target; bentham and regret: loss (MSE), MAE and Pearson r over labelled items; surd:
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


# Which metric each module is judged by, and whether higher is better.
MODULE_METRIC = {
    "backbone": ("loss", False),
    "emotion": ("emotion_loss", False),
    "bentham": ("bentham_loss", False),
    "regret": ("regret_loss", False),
    "surd": ("surd_loss", False),
}
