"""The yardstick: linear models on the frozen encoder's mean-pooled vectors.

Logistic regression for emotion (on the argmax of the soft target), ridge regression for each
Bentham value, regret and the SURD shares, trained on the same training split. Their
predictions are scored by the same `head_metrics` as the network, so the report shows at once
what the big model adds over a linear probe.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge

from redheart.data.features import FeatureSource
from redheart.train.metrics import head_metrics


@torch.no_grad()
def pooled(source: FeatureSource, batch: int = 64) -> np.ndarray:
    rows = []
    for s in range(0, len(source.data), batch):
        idx = list(range(s, min(s + batch, len(source.data))))
        states, b = source(idx)
        keep = b.keep.to(states.device).unsqueeze(-1).float()
        rows.append(((states.float() * keep).sum(1) / keep.sum(1)).cpu())
    return torch.cat(rows).numpy() if rows else np.zeros((0, 1))


def _ridge(x: np.ndarray, y: np.ndarray, mask: np.ndarray, xs: list[np.ndarray]) -> list[np.ndarray]:
    if mask.sum() < 2:
        return [np.full(len(z), float(y[mask].mean()) if mask.any() else 0.5) for z in xs]
    model = Ridge(alpha=1.0).fit(x[mask], y[mask])
    return [model.predict(z) for z in xs]


def linear_probe(train: FeatureSource, evals: dict[str, FeatureSource], weights: dict[str, float]) -> dict[str, dict]:
    """Fit on `train`, return the metrics on each named split in `evals`."""
    xt = pooled(train)
    d = train.data
    xs = {name: pooled(src) for name, src in evals.items()}
    names = list(xs)
    preds = {n: {} for n in names}
    em = d.emotion_mask.numpy()
    labels = d.emotion.argmax(-1).numpy()
    if em.sum() >= 2 and len(set(labels[em])) >= 2:
        clf = LogisticRegression(max_iter=2000).fit(xt[em], labels[em])
        for n in names:
            proba = np.full((len(xs[n]), 7), 1e-6)
            proba[:, clf.classes_] = clf.predict_proba(xs[n]) if len(xs[n]) else proba[:, clf.classes_]
            preds[n]["emotion"] = torch.tensor(np.log(proba / proba.sum(1, keepdims=True)), dtype=torch.float32)
    else:
        for n in names:
            preds[n]["emotion"] = torch.zeros(len(xs[n]), 7)
    ben = d.bentham.numpy()
    bmask = d.bentham_mask.numpy()
    cols = [_ridge(xt, ben[:, j], bmask[:, j], [xs[n] for n in names]) for j in range(ben.shape[1])]
    reg = _ridge(xt, d.regret.numpy(), d.regret_mask.numpy(), [xs[n] for n in names])
    surd_mask = d.surd_mask.numpy()
    surd_cols = [_ridge(xt, d.surd.numpy()[:, j], surd_mask, [xs[n] for n in names]) for j in range(4)]
    for i, n in enumerate(names):
        preds[n]["bentham"] = torch.tensor(np.clip(np.stack([c[i] for c in cols], 1), 0, 1), dtype=torch.float32)
        preds[n]["regret"] = torch.tensor(np.clip(reg[i], 0, 1), dtype=torch.float32)
        shares = np.clip(np.stack([c[i] for c in surd_cols], 1), 1e-4, None)
        preds[n]["surd"] = torch.tensor(np.log(shares / shares.sum(1, keepdims=True)), dtype=torch.float32)
    out = {}
    for n, src in evals.items():
        tgt = src.data.targets(torch.arange(len(src.data)))
        out[n] = head_metrics(preds[n], tgt, weights)
    return out
