"""`redheart crossover RUN_DIR` and `redheart plot RUN_DIR`: analysis of a finished run.

`plot` prints one JSON line: {"path": PNG, "panels": number of panels drawn with data}.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from redheart.ckpt import io as ckio
from redheart.ckpt.state import RunPaths, snapshot_entries, timestamp
from redheart.config import Config, parse_assignment, set_value
from redheart.runlog import setup_logging

log = logging.getLogger("redheart")


def newest_run(root: Path, run_id: str | None) -> str:
    if run_id:
        return run_id
    entries = snapshot_entries(root)
    if entries:
        return max(entries, key=lambda e: e["timestamp"])["run_id"]
    metrics = sorted((root / "logs").glob("metrics_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not metrics:
        raise ckio.CheckpointError(f"{root} holds no run (no metadata.json entries, no logs/metrics_*.jsonl)")
    return metrics[-1].stem.removeprefix("metrics_")


def read_history(paths: RunPaths) -> list[dict]:
    if not paths.metrics_file.is_file():
        raise ckio.CheckpointError(f"no metrics record {paths.metrics_file}")
    history = [json.loads(line) for line in paths.metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not history:
        raise ckio.CheckpointError(f"{paths.metrics_file} holds no epoch yet: nothing to plot")
    return history


def crossover_command(args) -> int:
    from redheart.analysis import run_crossover
    from redheart.session import build_session

    root = Path(args.run_dir)
    setup_logging(args.debug)
    paths = RunPaths(root, newest_run(root, args.run_id))
    entries = snapshot_entries(root, paths.run_id)
    if not entries:
        raise ckio.CheckpointError(f"run {paths.run_id} has no snapshot left in {paths.checkpoints}")
    newest = max(entries, key=lambda e: e["epoch"])
    cfg = Config.from_dict(ckio.load(newest["path"], newest.get("sha256"), mmap=True)["config"])
    cfg.output_dir, cfg.train.device = str(root), args.device
    for a in args.set:
        k, v = parse_assignment(a)
        set_value(cfg, k, v)
    cfg.validate()
    report = run_crossover(build_session(cfg), paths, read_history(paths), timestamp())
    print(json.dumps({"crossover_file": report["crossover_file"], "sources": report["sources"],
                      "val_loss": {k: v["val"].get("loss") for k, v in report["scores"].items()}}, indent=2))
    return 0


def plot_command(args) -> int:
    from redheart.plots import plot_training_curves

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
