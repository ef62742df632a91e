"""The yardstick: linear models on the frozen encoder's mean-pooled vectors.

Per head (redheart/heads.py): logistic regression for a `classes` head (emotion, on the argmax
of the soft target), ridge regression for each value of a `values` head (Bentham, regret) and
for each share of a `shares` head (SURD), trained on the same training split. Their
predictions are scored by the same `head_metrics` as the network, so the report shows at once
what the big model adds over a linear probe.
"""
from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge

from redheart import heads
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


def _probe(head: heads.Head, xt: np.ndarray, y: np.ndarray, mask: np.ndarray,
           xs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One head's linear predictions for each split in `xs`, as `head_metrics` takes them (a
    distribution's log-shares, the values clipped to [0, 1]), from targets `y` and their mask."""
    names = list(xs)
    if head.kind == "classes":
        labels = y.argmax(-1)
        if mask.sum() >= 2 and len(set(labels[mask])) >= 2:
            clf = LogisticRegression(max_iter=2000).fit(xt[mask], labels[mask])
            out = {}
            for n in names:
                proba = np.full((len(xs[n]), head.size), 1e-6)
                proba[:, clf.classes_] = clf.predict_proba(xs[n]) if len(xs[n]) else proba[:, clf.classes_]
                out[n] = np.log(proba / proba.sum(1, keepdims=True))
            return out
        return {n: np.zeros((len(xs[n]), head.size)) for n in names}
    y, mask = y.reshape(len(y), -1), mask.reshape(len(mask), -1)
    cols = [_ridge(xt, y[:, j], mask[:, j if head.per_element else 0], [xs[n] for n in names])
            for j in range(head.size)]
    out = {}
    for i, n in enumerate(names):
        p = np.stack([c[i] for c in cols], 1)
        if head.kind == "values":
            out[n] = np.clip(p, 0, 1)
        else:
            shares = np.clip(p, 1e-4, None)
            out[n] = np.log(shares / shares.sum(1, keepdims=True))
    return out


def linear_probe(train: FeatureSource, evals: dict[str, FeatureSource], weights: dict[str, float]) -> dict[str, dict]:
    """Fit on `train`, return the metrics on each named split in `evals`."""
    xt = pooled(train)
    d = train.data
    xs = {name: pooled(src) for name, src in evals.items()}
    names = list(xs)
    preds = {n: {} for n in names}
    for h in heads.HEADS:
        for n, p in _probe(h, xt, getattr(d, h.name).numpy(), getattr(d, f"{h.name}_mask").numpy(), xs).items():
            preds[n][h.name] = torch.tensor(p, dtype=torch.float32).reshape(h.shape(len(xs[n])))
    out = {}
    for n, src in evals.items():
        tgt = src.data.targets(torch.arange(len(src.data)))
        out[n] = head_metrics(preds[n], tgt, weights)
    return out
