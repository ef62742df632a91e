"""Plots (matplotlib, PNG) in one style: the LR sweep, each module's Sweet Spot, the training
curves of a run from its metrics record, and memory over steps."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
         "axes.spines.right": False, "font.size": 9, "legend.fontsize": 8, "axes.titlesize": 10}

HEAD_PANELS = [  # (title, train key, val keys, y label)
    ("Combined loss", "loss", ["loss"], "loss"),
    ("Emotion", "emotion", ["emotion_loss"], "cross-entropy"),
    ("Emotion accuracy / macro-F1", None, ["emotion_acc", "emotion_f1"], "score"),
    ("Bentham", "bentham", ["bentham_loss"], "MSE"),
    ("Regret", "regret", ["regret_loss"], "MSE"),
    ("SURD", "surd", ["surd_loss"], "cross-entropy"),
]


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def _finite(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_lr_sweep(result: dict[str, Any], path: Path) -> str:
    with plt.rc_context(STYLE):
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
        for p in result["points"]:
            xs, ys = _finite(p["steps"], p["curve"])
            style = "--" if p.get("diverged") else "-"
            a.plot(xs, ys, style, marker="o", ms=3, label=f"lr {p['lr']:.1e}" + (" (diverged)" if p.get("diverged") else ""))
        a.axhline(result["start_loss"], color="grey", lw=0.8, ls=":", label="start")
        a.set(xlabel="optimizer step", ylabel="validation loss", title="Validation loss per learning rate")
        a.legend()
        ok = [p for p in result["points"] if not p.get("diverged")]
        bad = [p for p in result["points"] if p.get("diverged")]
        b.plot([p["lr"] for p in sorted(ok, key=lambda p: p["lr"])],
               [p["score"] for p in sorted(ok, key=lambda p: p["lr"])], "o-", label="score")
        if bad:
            top = max([p["score"] for p in ok] + [result["start_loss"]])
            b.plot([p["lr"] for p in bad], [top] * len(bad), "x", color="red", ms=8, label="diverged")
        if result.get("selected") is not None:
            b.axvline(result["selected"], color="green", ls="--", label=f"chosen {result['selected']:.1e}")
        b.set_xscale("log")
        b.set(xlabel="learning rate (log scale)", ylabel="score: mean of last validation losses",
              title="Sweep score vs learning rate")
        b.legend()
        return _save(fig, path)


def plot_sweet_spot(module: str, res: dict[str, Any], path: Path) -> str:
    from redheart.ckpt.sweetspot import smooth_curve

    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ep, vals = res["curve"]["epochs"], res["curve"]["values"]
        ax.plot(ep, vals, "o-", ms=3, alpha=0.6, label="validation")
        if len(vals) >= 3:
            ax.plot(ep, smooth_curve(vals, res.get("smoothing", 3)), "-", lw=2, label="smoothed")
        if res.get("epoch") is not None:
            ax.axvline(res["epoch"], color="green", ls="--",
                       label=f"sweet spot: epoch {res['epoch']} (conf {res['confidence']:.2f})")
        ax.set(xlabel="epoch", ylabel=f"validation {res['metric']}", title=f"Sweet Spot: {module}")
        ax.legend()
        return _save(fig, path)


def plot_training_curves(history: list[dict[str, Any]], path: Path,
                         sweet_spots: dict[str, Any] | None = None) -> str:
    """Every head's train and validation (raw and EMA) curves, the LR, throughput and memory."""
    epochs = [r["epoch"] for r in history]
    module_of_panel = {"Combined loss": "backbone", "Emotion": "emotion", "Bentham": "bentham",
                       "Regret": "regret", "SURD": "surd"}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(3, 3, figsize=(13, 10))
        axes = axes.ravel()
        for ax, (title, tkey, vkeys, ylabel) in zip(axes, HEAD_PANELS):
            if tkey is not None:
                ax.plot(*_finite(epochs, [r["train"].get(tkey) for r in history]), "o-", ms=3, label="train")
            for vk in vkeys:
                ax.plot(*_finite(epochs, [r["val"].get(vk) for r in history]), "o-", ms=3, label=f"val {vk}")
                if any(r.get("val_ema") for r in history):
                    ax.plot(*_finite(epochs, [(r.get("val_ema") or {}).get(vk) for r in history]), "s--",
                            ms=3, alpha=0.8, label=f"val EMA {vk}")
            module = module_of_panel.get(title)
            if sweet_spots and module in sweet_spots and sweet_spots[module].get("epoch") is not None:
                ax.axvline(sweet_spots[module]["epoch"], color="green", ls=":", label="sweet spot")
            ax.set(title=title, xlabel="epoch", ylabel=ylabel)
            ax.legend()
        ax = axes[6]
        ax.plot(epochs, [r["lr"] for r in history], "o-", ms=3)
        ax.set(title="Learning rate (end of epoch)", xlabel="epoch", ylabel="LR")
        ax.set_yscale("log")
        ax = axes[7]
        ax.plot(epochs, [r["samples_per_s"] for r in history], "o-", ms=3, label="samples/s")
        ax.set(title="Throughput", xlabel="epoch", ylabel="samples / s")
        ax.legend()
        ax = axes[8]
        mem_key = "peak_gib" if "peak_gib" in history[0]["memory"] else "rss_gib"
        ax.plot(epochs, [r["memory"].get(mem_key) for r in history], "o-", ms=3, label=mem_key)
        ax.set(title="Memory", xlabel="epoch", ylabel="GiB")
        ax.legend()
        return _save(fig, path)


def plot_memory(samples: list[dict[str, float]], path: Path) -> str:
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        steps = [s["step"] for s in samples]
        for key in ("allocated_gib", "reserved_gib", "peak_gib", "rss_gib"):
            if key in samples[0]:
                ax.plot(steps, [s[key] for s in samples], label=key.replace("_gib", ""))
        ax.set(xlabel="optimizer step", ylabel="GiB", title="Memory per step")
        ax.legend()
        return _save(fig, path)
