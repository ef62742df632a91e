"""Sweet Spot: for each module, the epoch where it was best on validation (pure functions).

The rule, made to resist noise:
1. Smooth the validation curve: a running median over `smoothing` epochs (a one-epoch spike
   cannot win), then a running mean over the same window.
2. The best smoothed value among the candidate epochs (those with a saved snapshot).
3. The plateau: candidates whose smoothed value lies within `tolerance` (relative) of the best;
   the sweet spot is the earliest of them (later epochs bring nothing measurable).
4. A Mann-Kendall trend test (Kendall's tau of the curve's last half against time, from
   scipy) says whether the metric was still improving when training ended; if it was, the
   best smoothed epoch is the sweet spot instead of the plateau's start.
Confidence in [0, 1] = depth / (depth + 2 * noise), where depth is how far the best smoothed
value lies below the median of the epochs off its plateau and noise is the robust spread of the raw values around
the smoothed curve; halved when the metric was still improving at the end.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from redheart import heads
from redheart.config import Config


def module_metric(module: str) -> tuple[str, bool]:
    """The validation metric a module is judged by, and whether higher is better: the backbone
    by the combined loss, a head by its own loss."""
    return ("loss", False) if module == "backbone" else (f"{module}_loss", False)


def _running(values: np.ndarray, window: int, fn) -> np.ndarray:
    half = window // 2
    out = np.empty_like(values)
    for i in range(len(values)):
        out[i] = fn(values[max(0, i - half): i + half + 1])
    return out


def _upper_median(w: np.ndarray) -> float:
    """The median, and for an even count (a window cut short at either end) the worse (higher)
    of the two middle values: a plain median of two is their mean, which let a one-epoch spike
    at the first or last epoch win by half its depth."""
    return float(np.sort(w)[len(w) // 2])


def smooth_curve(values: list[float], window: int) -> np.ndarray:
    """Smoothed curve of values where lower is better (callers flip the sign otherwise)."""
    y = np.asarray(values, dtype=float)
    if window <= 1 or len(y) < 3:
        return y.copy()
    return _running(_running(y, window, _upper_median), window, np.mean)


def find_sweet_spot(epochs: list[int], values: list[float], candidates: set[int] | None = None,
                    higher_is_better: bool = False, smoothing: int = 3, tolerance: float = 0.01,
                    trend_alpha: float = 0.05) -> dict[str, Any]:
    """The sweet spot of one validation curve.

    `epochs` and `values` are parallel (non-finite values are left out); `candidates` limits
    the choice to epochs that can be loaded (None = any). Returns epoch, value (raw), smoothed,
    confidence, still_improving, plateau (epochs) and reason (words).
    """
    pts = [(e, v) for e, v in zip(epochs, values) if v is not None and math.isfinite(v)]
    if not pts:
        return {"epoch": None, "confidence": 0.0, "reason": "no validation values"}
    ep = [e for e, _ in pts]
    sign = -1.0 if higher_is_better else 1.0
    y = sign * np.array([v for _, v in pts])
    ys = smooth_curve(list(y), smoothing)
    cand = [i for i, e in enumerate(ep) if candidates is None or e in candidates]
    if not cand:
        return {"epoch": None, "confidence": 0.0, "reason": "no saved snapshot among the validated epochs"}
    best_i = min(cand, key=lambda i: (ys[i], y[i]))
    best = ys[best_i]
    margin = tolerance * max(abs(best), 1e-12)
    plateau = [i for i in cand if ys[i] <= best + margin]

    still_improving = False
    tail = y[len(y) // 2:]
    if len(tail) >= 4:
        from scipy import stats  # here, not at import: scipy.stats adds about a second to every start

        tau, p = stats.kendalltau(np.arange(len(tail)), tail)
        still_improving = bool(tau < 0 and p < trend_alpha)
    # The plateau rule assumes later epochs bring nothing measurable; a significant downward
    # trend at the end says they do (a slow steady improvement stays within `tolerance` from
    # one epoch to the next), so then the best smoothed epoch itself is taken.
    chosen = best_i if still_improving else plateau[0]

    noise = 1.4826 * float(np.median(np.abs(y - ys))) if len(y) >= 3 else 0.0
    # Depth: how far the best lies below the epochs that are not on its plateau (a curve that
    # converges early and stays flat is still a clear result; a flat one from the start is not).
    outside = [ys[i] for i in range(len(ys)) if ys[i] > best + margin]
    depth = float(np.median(outside) - best) if outside else 0.0
    if len(y) < 3:
        confidence = 0.3 if len(y) == 2 and y[-1] != y[0] else 0.1
    else:
        confidence = depth / (depth + 2 * noise) if depth + noise > 0 else 0.0
    last_chosen = ep[chosen] == max(ep[i] for i in cand)
    if still_improving and last_chosen:
        confidence *= 0.5

    words = [f"smoothed best {sign * best:.4f} at epoch {ep[best_i]}"]
    if chosen != best_i:
        words.append(f"epoch {ep[chosen]} is the first within {tolerance:.1%} of it (plateau of "
                     f"{len(plateau)} epochs)")
    if y[best_i] != min(y):
        spike = ep[int(np.argmin(y))]
        if spike != ep[chosen]:
            words.append(f"the raw minimum at epoch {spike} was not kept (not borne out by its neighbours)")
    if still_improving:
        words.append("still improving at the end (Mann-Kendall p < %.2g): more epochs may help" % trend_alpha)
    if len(y) < 3:
        words.append(f"only {len(y)} epoch(s) of history")
    return {
        "epoch": ep[chosen], "value": float(sign * y[chosen]), "smoothed": float(sign * ys[chosen]),
        "confidence": float(max(0.0, min(1.0, confidence))), "still_improving": still_improving,
        "plateau": [ep[i] for i in plateau], "reason": "; ".join(words),
    }


def metric_series(history: list[dict[str, Any]], key: str, weights: str = "raw") -> tuple[list[int], list[float]]:
    """(epochs, values) of one validation metric from the metrics records."""
    field = "val_ema" if weights == "ema" else "val"
    epochs, values = [], []
    for r in history:
        block = r.get(field) or {}
        if key in block:
            epochs.append(int(r["epoch"]))
            values.append(float(block[key]))
    return epochs, values


def analyse(history: list[dict[str, Any]], candidates: set[int] | None, cfg: Config,
            weights: str = "raw") -> dict[str, dict[str, Any]]:
    """The sweet spot of every module; a module whose head has no validation targets is marked."""
    out = {}
    for module in heads.modules():
        key, higher = module_metric(module)
        epochs, values = metric_series(history, key, weights)
        if not epochs:
            out[module] = {"epoch": None, "metric": key, "confidence": 0.0, "no_targets": True,
                           "reason": f"no validation targets for {module}: left out"}
            continue
        res = find_sweet_spot(epochs, values, candidates, higher, cfg.sweetspot.smoothing,
                              cfg.sweetspot.tolerance, cfg.sweetspot.trend_alpha)
        res.update(metric=key, no_targets=False, curve={"epochs": epochs, "values": values})
        out[module] = res
    return out


def snapshot_epochs(history: list[dict[str, Any]], cfg: Config) -> set[int]:
    """Epochs that get a snapshot: every `save_every` and the last planned one."""
    return {int(r["epoch"]) for r in history
            if int(r["epoch"]) % cfg.train.save_every == 0 or int(r["epoch"]) == cfg.train.epochs}


def pinned_epochs(history: list[dict[str, Any]], cfg: Config) -> set[int]:
    """Snapshots retention must keep: each module's sweet spot and its plateau, and the best
    epoch by combined validation loss (the Crossover's starting point)."""
    if not history:
        return set()
    cands = snapshot_epochs(history, cfg)
    pins: set[int] = set()
    for res in analyse(history, cands, cfg, cfg.train.snapshot_weights).values():
        if res.get("epoch") is not None:
            pins.add(res["epoch"])
            pins.update(res.get("plateau", []))
    pins.add(best_epoch(history, cands, cfg.train.snapshot_weights))
    return {p for p in pins if p is not None}


def best_epoch(history: list[dict[str, Any]], candidates: set[int], weights: str = "raw") -> int | None:
    epochs, values = metric_series(history, "loss", weights)
    pts = [(v, e) for e, v in zip(epochs, values) if e in candidates and math.isfinite(v)]
    return min(pts)[1] if pts else None
