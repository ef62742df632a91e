"""What users look at after a run: TensorBoard event files (read back with TensorBoard's own
reader) and the training-curve, LR sweep and Sweet Spot plots (panels, ticks, log axes, and
legends that hide no data)."""
import json
import math
import subprocess
import sys
import warnings

import matplotlib.pyplot as plt
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from redheart import plots
from redheart.tb import TensorBoard

from helpers import ROOT


def _history(root, run_id):
    text = (root / "logs" / f"metrics_{run_id}.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _leaves(record, prefix=""):
    """Every number of a nested record, by slash-joined path."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[f"{prefix}{k}"] = float(v)
    return out


def _scalars(folder):
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_holds_every_scalar_of_the_metrics_record(tiny_run):
    root, run_id = tiny_run
    history = _history(root, run_id)
    scalars = _scalars(root / "logs" / f"tb_{run_id}")

    expected: dict[str, list[tuple[int, float]]] = {}
    for record in history:
        for tag, value in _leaves(record).items():
            if tag not in ("epoch", "global_step", "memory/t"):
                expected.setdefault(tag, []).append((record["epoch"], value))
    heads = ("emotion", "bentham", "regret", "surd")
    required = {"lr", "samples_per_s", "tokens_per_s", "tflops", "memory/rss_gib", "train/loss", "train/rdrop",
                *(f"train/{h}" for h in heads),
                *(f"{w}/{m}" for w in ("val", "val_ema") for m in
                  ("loss", "emotion_acc", "emotion_f1", "bentham_mae", "bentham_r", "regret_mae", "regret_r",
                   "surd_mae", *(f"{h}_loss" for h in heads)))}
    assert required <= set(expected), required - set(expected)
    if all(r.get("lr_steps") for r in history):
        expected["lr_per_step"] = [(s, v) for r in history for s, v in
                                   zip(range(r["global_step"] - len(r["lr_steps"]) + 1, r["global_step"] + 1),
                                       r["lr_steps"])]
    assert set(scalars) == set(expected)
    for tag, points in expected.items():
        events = scalars[tag]
        assert [e.step for e in events] == [s for s, _ in points], tag
        assert [e.value for e in events] == pytest.approx([v for _, v in points], rel=1e-6, abs=1e-12), tag
    assert [e.step for e in scalars["val/loss"]] == [1, 2]


def test_tensorboard_writes_per_step_learning_rates_at_their_optimizer_steps(tmp_path):
    record = {"epoch": 2, "global_step": 6, "lr": 0.0, "lr_steps": [3e-4, 2e-4, 1e-4], "timestamp": "x",
              "train": {"loss": 1.5}, "val": {"loss": 1.25, "regret_r": float("nan")}, "val_ema": None,
              "memory": {"t": 1.7e9, "rss_gib": 0.5}}
    tb = TensorBoard(tmp_path)
    tb.epoch(record)
    tb.close()
    scalars = _scalars(tmp_path)
    assert set(scalars) == {"lr", "train/loss", "val/loss", "memory/rss_gib", "lr_per_step"}
    assert [(e.step, e.value) for e in scalars["lr_per_step"]] == [(4, pytest.approx(3e-4)), (5, pytest.approx(2e-4)),
                                                                  (6, pytest.approx(1e-4))]
    assert [(e.step, e.value) for e in scalars["val/loss"]] == [(2, 1.25)]


# ---------------------------------------------------------------------------------------- plots


def _data_points_under_legends(fig) -> list[str]:
    """Where a legend box covers a plotted point: ['panel title: line label', ...]."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    hidden = []
    boxes = [(ax, ax.get_legend().get_window_extent(renderer)) for ax in fig.axes if ax.get_legend()]
    boxes += [(None, leg.get_window_extent(renderer)) for leg in fig.legends]
    for ax in fig.axes:
        for line in ax.get_lines():
            pts = line.get_transform().transform(line.get_xydata())
            for owner, box in boxes:
                if owner in (ax, None) and any(box.contains(x, y) for x, y in pts):
                    hidden.append(f"{ax.get_title()}: {line.get_label()}")
    return hidden


def _epoch_ticks_are_integers(fig) -> bool:
    for ax in fig.axes:
        if ax.get_xlabel() == "epoch":
            lo, hi = ax.get_xlim()
            if any(t != int(t) for t in ax.get_xticks() if lo <= t <= hi):
                return False
    return True


def test_training_curves_of_a_recorded_run_are_nine_readable_panels(tiny_run):
    root, run_id = tiny_run
    history = _history(root, run_id)
    spots = json.loads(next((root / "sweet_spot_analysis").glob("sweet_spot_analysis_*.json")).read_text())["modules"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. matplotlib's warning about non-positive values on a log axis
        with plt.rc_context(plots.STYLE):
            fig = plots.training_curves_figure(history, spots)
            assert plots.panel_count(fig) == plots.PANELS == len(fig.axes) == 9
            for ax in fig.axes:
                assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
            assert _epoch_ticks_are_integers(fig)
            (lr_ax,) = [ax for ax in fig.axes if ax.get_title().startswith("Learning rate")]
            assert lr_ax.get_yscale() == "log" and lr_ax.get_xlabel() == "optimizer step"
            # the LR each optimizer step used (all > 0), not the epoch-end value (the cosine's final 0)
            assert history[-1]["lr"] == 0 and all(r["lr_steps"] for r in history)
            assert "not shown" not in lr_ax.get_title()
            assert sum(len(line.get_xdata()) for line in lr_ax.get_lines()) >= sum(len(r["lr_steps"]) for r in history)
            assert _data_points_under_legends(fig) == []
            # the sweet spots are marked where the analysis put them
            (loss_ax,) = [ax for ax in fig.axes if ax.get_title() == "Combined loss"]
            assert spots["backbone"]["epoch"] in [line.get_xdata()[0] for line in loss_ax.get_lines()
                                                 if line.get_linestyle() == ":"]
            plt.close(fig)
    assert (root / "logs" / f"training_curves_{run_id}.png").stat().st_size > 10_000  # drawn by the run itself


def test_lr_panel_shows_each_optimizer_step_when_the_record_has_them(tiny_run):
    root, run_id = tiny_run
    history = _history(root, run_id)
    per_step = [dict(history[0], global_step=3, lr_steps=[1e-3 / 3, 2e-3 / 3, 1e-3]),
                dict(history[1], global_step=6, lr_steps=[5e-4, 1e-4, 0.0])]
    steps, lrs, what, dropped = plots.lr_series(per_step)
    assert what == "per optimizer step" and dropped == 1
    assert steps == [1, 2, 3, 4, 5] and lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 5e-4, 1e-4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with plt.rc_context(plots.STYLE):
            fig = plots.training_curves_figure(per_step)
            (lr_ax,) = [ax for ax in fig.axes if ax.get_title().startswith("Learning rate per optimizer step")]
            assert lr_ax.get_yscale() == "log" and list(lr_ax.get_lines()[0].get_xdata()) == steps
            fig.canvas.draw()
            plt.close(fig)
    bare = [{k: v for k, v in r.items() if k != "lr_steps"} for r in history]  # an older record
    steps, lrs, what, dropped = plots.lr_series(bare)  # without them: the end-of-epoch values
    assert what == "at the end of each epoch" and steps == [history[0]["global_step"]] and dropped == 1
    steps, lrs, what, dropped = plots.lr_series(history)  # the trainer records every step's LR
    assert what == "per optimizer step" and len(steps) == history[-1]["global_step"] and dropped == 0


def _check_png(path):
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (1300, 1000)
        lo, hi = img.convert("L").getextrema()
        assert hi - lo > 100  # something is drawn on the white page
    assert path.stat().st_size > 10_000


def test_plot_script_writes_a_png_of_nine_panels(tiny_run, tmp_path):
    root, _ = tiny_run
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "training/plot_training_curves.py", str(root), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"path": str(out), "panels": 9}
    _check_png(out)


def test_plot_command_writes_a_png_of_nine_panels(tiny_run, tmp_path, capsys):
    from redheart.cli import main

    root, run_id = tiny_run
    assert main(["plot", str(root), "--run-id", run_id, "--out", str(tmp_path / "c.png")]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(tmp_path / "c.png"), "panels": 9}
    _check_png(tmp_path / "c.png")


def test_a_run_without_any_epoch_cannot_be_plotted(tmp_path, capsys):
    from redheart.cli import main

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics_20260101_000000.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 2
    assert "holds no epoch yet" in capsys.readouterr().err


def test_lr_sweep_and_sweet_spot_plots_share_the_style(tiny_run, tmp_path, monkeypatch):
    root, _ = tiny_run
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or str(path))
    sweep = {"start_loss": 3.6, "selected": 1e-3, "points": [
        {"lr": lr, "steps": [5, 10, 15, 20], "curve": curve, "score": sum(curve[-3:]) / 3, "diverged": div}
        for lr, curve, div in [(1e-5, [3.6, 3.6, 3.59, 3.59], False), (1e-4, [3.5, 3.4, 3.3, 3.3], False),
                               (1e-3, [3.4, 3.2, 3.1, 3.0], False), (1e-2, [3.9, float("nan"), 5.0, 6.0], True)]]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.plot_lr_sweep(sweep, tmp_path / "sweep.png")
        spots = json.loads(next((root / "sweet_spot_analysis").glob("sweet_spot_analysis_*.json")).read_text())
        res = dict(spots["modules"]["emotion"], smoothing=3)
        plots.plot_sweet_spot("emotion", res, tmp_path / "spot.png")
    curves, score = figures[0].axes
    assert score.get_xscale() == "log" and "log scale" in score.get_xlabel()
    assert all(t == int(t) for t in curves.get_xticks())
    spot_ax = figures[1].axes[0]
    assert spot_ax.get_xlabel() == "epoch" and "nats" in spot_ax.get_ylabel()
    assert _epoch_ticks_are_integers(figures[1])
    assert any(line.get_xdata()[0] == res["epoch"] for line in spot_ax.get_lines() if line.get_linestyle() == ":")
    for fig in figures:
        assert _data_points_under_legends(fig) == []
        plt.close(fig)
    # the run drew one Sweet Spot plot per module
    assert len(list((root / "sweet_spot_analysis" / "plots").glob("sweet_spot_*.png"))) == 5
