"""Plots (matplotlib, PNG) in one style: the LR sweep, each module's Sweet Spot, the training
curves of a run from its metrics record, and memory over steps.

`redheart plot RUN_DIR` (`plot_command`) redraws a run's training curves and prints one JSON
line: {"path": PNG, "panels": number of panels drawn with data}.

The style: integer ticks on epoch axes, units in the axis labels, log scales for learning
rates, and legends outside the data (beside the axes, above the panels, or in headroom the
axes keep free for them), so no curve is hidden behind one.
"""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from redheart import heads  # noqa: E402

STYLE = {"figure.dpi": 100, "savefig.dpi": 100, "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False, "font.size": 9, "legend.fontsize": 8,
         "axes.titlesize": 10, "lines.markersize": 4}

# One look per series everywhere: raw and EMA validation share a colour, EMA is dashed and hollow.
TRAIN = dict(color="tab:blue", ls="-", marker="o")
VAL = dict(color="tab:orange", ls="-", marker="o")
VAL_EMA = dict(color="tab:orange", ls="--", marker="s", mfc="none")
SWEET = dict(color="tab:green", ls=":", lw=1.8)



def metric_label(metric: str) -> str:
    """A validation metric's axis label, with its unit."""
    if metric == "loss":
        return "combined loss (weighted sum of head losses)"
    for h in heads.HEADS:
        if metric == f"{h.name}_loss":
            return f"{h.label} {h.loss_unit}"
    return f"validation {metric}"


def head_panels() -> list[tuple[str, str, str, str, str]]:
    """The loss panels of the training curves: (title, train key, validation key, y label,
    module whose sweet spot it shows); the combined loss, then each head's."""
    return [("Combined loss", "task", "loss", "loss (weighted sum of heads)", "backbone"),
            *((h.label[0].upper() + h.label[1:], h.name, f"{h.name}_loss", h.loss_unit, h.name) for h in heads.HEADS)]


PANELS = 9  # the combined and the four heads' losses, emotion accuracy/F1, LR, throughput, memory


def _save(fig: Figure, path: Path, dpi: float | None = None) -> str:
    """Draw into memory, then write atomically (a full disk leaves no half image, and is a failed
    write like any other: `ckio.WriteFailed`)."""
    import io

    from redheart.ckpt.io import atomic_write_bytes

    path = Path(path)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=dpi or "figure", format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)
    return str(path)


def _finite(xs, ys):
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _integer_x(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _legend_beside(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _legend_in_headroom(ax, top: float | None = None, ncol: int = 2) -> None:
    """Raise the top of the y-axis by a third and put the legend in that free band."""
    lo, hi = ax.get_ylim()
    hi = top if top is not None else hi
    ax.set_ylim(lo, hi + (hi - lo) * 0.35)
    ax.legend(loc="upper center", ncol=ncol, framealpha=0.9)


# ---------------------------------------------------------------------------------------- LR sweep


def plot_lr_sweep(result: dict[str, Any], path: Path) -> str:
    with plt.rc_context(STYLE):
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
        for p in sorted(result["points"], key=lambda p: p["lr"]):
            xs, ys = _finite(p["steps"], p["curve"])
            label = f"LR {p['lr']:.1e}" + (" (diverged)" if p.get("diverged") else "")
            a.plot(xs, ys, "--" if p.get("diverged") else "-", marker="o", label=label)
        a.axhline(result["start_loss"], color="grey", lw=0.8, ls=":", label="before training")
        a.set(xlabel="optimizer step of the sweep run", ylabel="validation loss (weighted sum of heads)",
              title="Validation loss per learning rate")
        _integer_x(a)
        _legend_beside(a)
        ok = sorted((p for p in result["points"] if not p.get("diverged")), key=lambda p: p["lr"])
        bad = [p for p in result["points"] if p.get("diverged")]
        b.plot([p["lr"] for p in ok], [p["score"] for p in ok], "o-", color="tab:blue", label="score")
        if bad:
            top = max([p["score"] for p in ok] + [result["start_loss"]])
            b.plot([p["lr"] for p in bad], [top] * len(bad), "x", color="tab:red", ms=8, label="diverged")
        if result.get("selected") is not None:
            b.axvline(result["selected"], color=SWEET["color"], ls="--", label=f"chosen {result['selected']:.1e}")
        b.set_xscale("log")
        b.set(xlabel="learning rate (log scale)", ylabel="score: mean of the last validation losses",
              title="Sweep score per learning rate (lower is better)")
        _legend_beside(b)
        return _save(fig, path)


# ---------------------------------------------------------------------------------------- Sweet Spot


def plot_sweet_spot(module: str, res: dict[str, Any], path: Path) -> str:
    from redheart.ckpt.sweetspot import smooth_curve

    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
        ep, vals = res["curve"]["epochs"], res["curve"]["values"]
        ax.plot(ep, vals, label="validation", **VAL)
        if len(vals) >= 3:
            ax.plot(ep, smooth_curve(vals, res.get("smoothing", 3)), "-", lw=2, color="tab:blue", label="smoothed")
        plateau = res.get("plateau") or []
        if len(plateau) > 1:
            ax.axvspan(min(plateau) - 0.3, max(plateau) + 0.3, color=SWEET["color"], alpha=0.08,
                       label="plateau (near the best)")
        if res.get("epoch") is not None:
            ax.axvline(res["epoch"], **SWEET, label=f"sweet spot: epoch {res['epoch']} "
                                                    f"(confidence {res['confidence']:.2f})")
        ax.set(xlabel="epoch", ylabel=metric_label(res["metric"]),
               title=f"Sweet Spot: {module}")
        _integer_x(ax)
        _legend_beside(ax)
        if res.get("reason"):
            fig.text(0.01, 0.0, textwrap.fill(res["reason"], 130), fontsize=7, color="0.35", va="bottom")
            fig.get_layout_engine().set(rect=(0, 0.07, 1, 0.93))
        return _save(fig, path)


# ---------------------------------------------------------------------------------------- run curves


def lr_series(history: list[dict[str, Any]]) -> tuple[list[int], list[float], str, int]:
    """(optimizer steps, learning rates, what they are, how many were dropped) for a log axis.

    Uses the per-step values an epoch record carries in `lr_steps` (the LR of each of the
    epoch's optimizer steps, ending at its `global_step`), else each epoch's end-of-epoch LR.
    Values <= 0 (a cosine that ends at 0) cannot sit on a log axis and are dropped and counted.
    """
    steps: list[int] = []
    lrs: list[float] = []
    per_step = all(r.get("lr_steps") for r in history)
    for r in history:
        if per_step:
            first = int(r["global_step"]) - len(r["lr_steps"]) + 1
            steps += range(first, first + len(r["lr_steps"]))
            lrs += [float(v) for v in r["lr_steps"]]
        else:
            steps.append(int(r["global_step"]))
            lrs.append(float(r["lr"]))
    keep = [(s, v) for s, v in zip(steps, lrs) if math.isfinite(v) and v > 0]
    what = "per optimizer step" if per_step else "at the end of each epoch"
    return [k[0] for k in keep], [k[1] for k in keep], what, len(steps) - len(keep)


def _memory_series(history: list[dict[str, Any]]) -> list[tuple[str, list[float | None]]]:
    names = {"peak_gib": "GPU peak allocated", "reserved_gib": "GPU reserved", "rss_gib": "process RSS (CPU)"}
    present = [k for k in names if any(k in (r.get("memory") or {}) for r in history)]
    return [(names[k], [(r.get("memory") or {}).get(k) for r in history]) for k in present]


def training_curves_figure(history: list[dict[str, Any]], sweet_spots: dict[str, Any] | None = None) -> Figure:
    """The 3x3 figure of a run: each head's train and validation (raw and EMA) loss with its
    sweet spot, emotion accuracy and macro-F1, the LR schedule, throughput and memory."""
    if not history:
        raise ValueError("the metrics record is empty: no epoch has finished yet")
    epochs = [r["epoch"] for r in history]
    has_ema = any(r.get("val_ema") for r in history)
    spots = {m: s.get("epoch") if isinstance(s, dict) else s for m, s in (sweet_spots or {}).items()}
    fig, grid = plt.subplots(3, 3, figsize=(13, 10), layout="constrained")
    axes = list(grid.ravel())
    order = [axes[0], axes[1], axes[3], axes[4], axes[5]]  # axes[2]: accuracy/F1 beside the emotion loss
    # the grid has room for four heads' losses: a head added to the table has none here yet
    for ax, (title, tkey, vkey, ylabel, module) in zip(order, head_panels()):
        train = [r["train"].get(tkey, r["train"].get("loss") if tkey == "task" else None) for r in history]
        ax.plot(*_finite(epochs, train), **TRAIN)
        ax.plot(*_finite(epochs, [r["val"].get(vkey) for r in history]), **VAL)
        if has_ema:
            ax.plot(*_finite(epochs, [(r.get("val_ema") or {}).get(vkey) for r in history]), **VAL_EMA)
        if spots.get(module) is not None:
            ax.axvline(spots[module], **SWEET)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)

    ax = axes[2]
    for key, name, color in (("emotion_acc", "accuracy", "tab:red"), ("emotion_f1", "macro-F1", "tab:purple")):
        ax.plot(*_finite(epochs, [r["val"].get(key) for r in history]), color=color, ls="-", marker="o",
                label=name)
        if has_ema:
            ax.plot(*_finite(epochs, [(r.get("val_ema") or {}).get(key) for r in history]), color=color,
                    ls="--", marker="s", mfc="none", label=f"{name}, EMA")
    ax.set(title="Emotion accuracy and macro-F1 (validation)", xlabel="epoch", ylabel="score (0 to 1)")
    ax.set_ylim(0, 1)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    _legend_in_headroom(ax, top=1.0)

    ax = axes[6]
    steps, lrs, what, dropped = lr_series(history)
    ax.plot(steps, lrs, "-", color="tab:blue", marker="o" if len(steps) <= 60 else None)
    if lrs:
        ax.set_yscale("log")
    note = f"\n({dropped} value{'s' if dropped > 1 else ''} of 0 not shown on the log axis)" if dropped else ""
    ax.set(title=f"Learning rate {what}{note}", xlabel="optimizer step", ylabel="learning rate (log scale)")
    ax.set_xlim(0, max(int(r["global_step"]) for r in history) + 1)

    ax = axes[7]
    ax.plot(*_finite(epochs, [r.get("samples_per_s") for r in history]), color="tab:blue", marker="o")
    ax.set(title="Training throughput", xlabel="epoch", ylabel="samples / s")
    ax.set_ylim(bottom=0)

    ax = axes[8]
    for (name, values), color in zip(_memory_series(history), ("tab:red", "tab:purple", "tab:gray")):
        ax.plot(*_finite(epochs, values), color=color, marker="o", label=name)
    ax.set(title="Memory at the end of each epoch", xlabel="epoch", ylabel="GiB")
    ax.set_ylim(bottom=0)
    if ax.lines:
        _legend_in_headroom(ax, ncol=1)

    for ax in axes:
        _integer_x(ax)
    handles = [Line2D([], [], label="train (mean over the epoch's steps)", **TRAIN),
               Line2D([], [], label="validation, raw weights", **VAL)]
    if has_ema:
        handles.append(Line2D([], [], label="validation, EMA weights", **VAL_EMA))
    if any(v is not None for v in spots.values()):
        handles.append(Line2D([], [], label="sweet spot of the module", **SWEET))
    fig.legend(handles=handles, loc="outside upper center", ncol=len(handles), frameon=False)
    fig.text(0.5, 0.0, "Train losses are with the run's label smoothing and without the R-Drop term; validation "
             "losses are without either, on the whole validation split.", ha="center", va="bottom",
             fontsize=8, color="0.35")
    fig.get_layout_engine().set(rect=(0, 0.02, 1, 0.98))
    return fig


def panel_count(fig: Figure) -> int:
    """Axes of the figure that show data."""
    return sum(1 for ax in fig.axes if ax.has_data())


def plot_training_curves(history: list[dict[str, Any]], path: Path, sweet_spots: dict[str, Any] | None = None,
                         dpi: float | None = None) -> dict[str, Any]:
    """Draw and save the training curves; returns {"path", "panels"}."""
    with plt.rc_context(STYLE):
        fig = training_curves_figure(history, sweet_spots)
        panels = panel_count(fig)
        return {"path": _save(fig, path, dpi), "panels": panels}


def plot_memory(samples: list[dict[str, float]], path: Path) -> str:
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
        steps = [s["step"] for s in samples]
        names = {"allocated_gib": "GPU allocated", "reserved_gib": "GPU reserved", "peak_gib": "GPU peak",
                 "rss_gib": "process RSS (CPU)"}
        for key, name in names.items():
            if key in samples[0]:
                ax.plot(steps, [s[key] for s in samples], label=name)
        ax.set(xlabel="optimizer step", ylabel="GiB", title="Memory per optimizer step")
        ax.set_ylim(bottom=0)
        _integer_x(ax)
        _legend_beside(ax)
        return _save(fig, path)


def plot_command(args) -> int:
    """`redheart plot RUN_DIR`: the training curves of the run (--run-id, or the newest), with
    the sweet spots of its newest Sweet Spot analysis when there is one."""
    from redheart.ckpt.state import RunPaths, newest_run, read_history

    root = Path(args.run_dir)
    paths = RunPaths(root, newest_run(root, args.run_id))
    history = read_history(paths)
    spots = None
    analyses = sorted(paths.sweetspot.glob("sweet_spot_analysis_*.json"), key=lambda p: p.stat().st_mtime)
    for p in reversed(analyses):
        doc = json.loads(p.read_text(encoding="utf-8"))
        if doc.get("run_id") == paths.run_id:
            spots = doc["modules"]
            break
    out = Path(args.out) if args.out else paths.logs / f"training_curves_{paths.run_id}.png"
    print(json.dumps(plot_training_curves(history, out, spots, dpi=args.dpi)))
    return 0
