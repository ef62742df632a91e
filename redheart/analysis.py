"""After training (or alone on a finished run directory, `redheart crossover RUN_DIR`): the
Sweet Spot files and the Parameter Crossover with its report of validation and test scores.

Outputs: `sweet_spot_analysis/sweet_spot_analysis_<ts>.json`, `sweet_spot_report_<ts>.txt`,
`plots/`; `checkpoints_final/crossover_final.pth` (+ `.safetensors`) and
`crossover_report_<ts>.{json,txt}`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from redheart import heads
from redheart.ckpt import io as ckio
from redheart.ckpt.crossover import average_states, greedy_crossover
from redheart.ckpt.state import (RunPaths, newest_run, read_history, read_registry, snapshot_entries,
                                 timestamp)
from redheart.ckpt.sweetspot import analyse, best_epoch
from redheart.config import Config
from redheart.model.network import RedHeartNet
from redheart.overrides import parse_assignment, set_value
from redheart.plots import plot_sweet_spot
from redheart.session import Session
from redheart.train.evaluation import evaluate, predict_split
from redheart.train.metrics import expected_calibration_error, fit_temperature
from redheart.train.plan import amp_dtype

log = logging.getLogger("redheart")


def write_sweet_spots(history: list[dict[str, Any]], cfg: Config, candidates: set[int], paths: RunPaths,
                      stamp: str) -> dict[str, Any]:
    weights = cfg.train.snapshot_weights
    result = analyse(history, candidates, cfg, weights)
    other = "ema" if weights == "raw" else "raw"
    compare = analyse(history, candidates, cfg, other) if any(r.get("val_ema") for r in history) else None
    folder = paths.sweetspot
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    for module, res in result.items():
        if res.get("epoch") is not None:
            res["smoothing"] = cfg.sweetspot.smoothing
            res["plot"] = plot_sweet_spot(module, res, folder / "plots" / f"sweet_spot_{module}_{stamp}.png")
    doc = {"run_id": paths.run_id, "weights": weights, "candidates": sorted(candidates), "modules": result,
           "compare_other_weights": {"weights": other, "modules": compare} if compare else None,
           "rule": {"smoothing": cfg.sweetspot.smoothing, "tolerance": cfg.sweetspot.tolerance,
                    "trend_alpha": cfg.sweetspot.trend_alpha}}
    ckio.atomic_write_text(json.dumps(doc, indent=2, allow_nan=True) + "\n",
                           folder / f"sweet_spot_analysis_{stamp}.json")
    lines = [f"Sweet Spot report: run {paths.run_id}, {len(history)} epochs, snapshot weights: {weights}",
             f"Candidates (epochs with a snapshot): {sorted(candidates)}", "",
             f"{'module':<10} {'epoch':>5} {'metric':<13} {'value':>9} {'conf':>5}  reason"]
    for module, res in result.items():
        if res.get("epoch") is None:
            lines.append(f"{module:<10} {'-':>5} {res['metric']:<13} {'-':>9} {'-':>5}  {res['reason']}")
        else:
            lines.append(f"{module:<10} {res['epoch']:>5} {res['metric']:<13} {res['value']:>9.4f} "
                         f"{res['confidence']:>5.2f}  {res['reason']}")
    if compare:
        lines += ["", f"With the {other} weights' validation metrics:"]
        for module, res in compare.items():
            lines.append(f"{module:<10} {res.get('epoch') if res.get('epoch') is not None else '-':>5} "
                         f"conf {res.get('confidence', 0):.2f}")
    ckio.atomic_write_text("\n".join(lines) + "\n", folder / f"sweet_spot_report_{stamp}.txt")
    log.info("Sweet Spot: %s", ", ".join(f"{m}@{r['epoch']}" for m, r in result.items() if r.get("epoch")))
    return result


def _as_float(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in state.items()}


def final_state(paths: RunPaths) -> dict[str, Any] | None:
    """The weights and the EMA of the run's newest resume state, if still on disk and sound. The
    file stays mapped: its AdamW moments (twice the model) are never read in."""
    for entry in reversed(read_registry(paths.root)):
        if entry.get("run_id") == paths.run_id:
            try:
                state = ckio.load(entry["path"], entry.get("sha256"), mmap=True)
                return {"model_state": state["model_state"], "ema": state.get("ema")}
            except ckio.CheckpointError as exc:
                log.warning("final state not usable: %s", exc)
    return None


def run_crossover(session: Session, paths: RunPaths, history: list[dict[str, Any]], stamp: str | None = None) -> dict[str, Any]:
    cfg = session.cfg
    stamp = stamp or timestamp()
    entries = snapshot_entries(paths.root, paths.run_id)
    by_epoch = {int(e["epoch"]): e for e in entries}
    if not by_epoch:
        raise ckio.CheckpointError(f"run {paths.run_id} has no epoch snapshot in {paths.checkpoints}")
    candidates = set(by_epoch)
    spots = write_sweet_spots(history, cfg, candidates, paths, stamp)

    device, dtype = session.device, amp_dtype(cfg, session.device)
    with device:  # made on the device: a 730M init on the CPU takes many seconds, and its weights are replaced
        model = RedHeartNet(cfg.model)
    cache: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(epoch: int) -> dict[str, torch.Tensor]:
        if epoch not in cache:
            e = by_epoch[epoch]
            cache[epoch] = _as_float(ckio.load(e["path"], e.get("sha256"), mmap=True)["model_state"])
        return cache[epoch]

    def scores(state: dict[str, torch.Tensor], split: str) -> dict[str, float]:
        model.load_state_dict(state)
        return evaluate(model, session.features[split], cfg, dtype)

    weights = cfg.train.snapshot_weights
    base_epoch = best_epoch(history, candidates, weights)
    base = snapshot(base_epoch)
    plan = []
    for module in heads.modules():
        res = spots[module]
        ep = res.get("epoch")
        if ep is None or ep == base_epoch:
            continue
        plan.append((module, f"epoch {ep}", snapshot(ep)))
        if cfg.crossover.average_neighbors:
            near = sorted(e for e in candidates if abs(e - ep) <= cfg.train.save_every)
            if len(near) > 1:
                plan.append((module, f"mean of epochs {near}", average_states([snapshot(e) for e in near])))
    result = greedy_crossover(base, f"epoch {base_epoch}", plan, lambda s: scores(s, "val")["loss"],
                              cfg.crossover.min_gain)
    for t in result["trials"]:
        log.info("crossover: %-8s from %-22s val loss %.4f %s", t["module"] or "base", t["source"], t["score"],
                 "kept" if t["kept"] else "rejected")

    final = final_state(paths)
    last_epoch = max(candidates)
    models = {"final_epoch": final["model_state"] if final else snapshot(last_epoch),
              "best_epoch": base, "crossover": result["state"]}
    if final is not None and final.get("ema"):
        models["ema"] = final["ema"]["shadow"]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name, state in models.items():
        table[name] = {"val": scores(_as_float(state), "val"),
                       "test": scores(_as_float(state), "test") if len(session.data.splits["test"]) else {}}
    try:
        from redheart.probe import linear_probe

        evals = {s: session.features[s] for s in ("val", "test") if len(session.data.splits[s])}
        table["linear_probe"] = linear_probe(session.features["train"], evals, cfg.train.head_weights)
    except Exception as exc:  # the yardstick is optional: never lose the crossover over it
        log.warning("linear probe skipped: %s", exc)

    calibration = calibrate(model, result["state"], session, cfg, dtype)
    source_epochs = {m: int(src.split()[1]) if src.startswith("epoch ") else None
                     for m, src in result["sources"].items()}
    out_path = paths.checkpoints / "crossover_final.pth"
    state = {k: v.detach().cpu().contiguous() for k, v in result["state"].items()}
    payload = {"kind": "crossover", "format": ckio.FORMAT_VERSION, "run_id": paths.run_id,
               "model_state": state, "sources": result["sources"], "source_epochs": source_epochs,
               "base_epoch": base_epoch, "scores": table, "trials": result["trials"], "config": cfg.to_dict(),
               "calibration": calibration}
    info = ckio.atomic_save(payload, out_path)
    save_file(state, str(out_path.with_suffix(".safetensors")),
              metadata={"run_id": paths.run_id, "sources": json.dumps(result["sources"])})
    report = {"run_id": paths.run_id, "base_epoch": base_epoch, "sources": result["sources"],
              "trials": result["trials"], "scores": table, "sweet_spots": {m: r.get("epoch") for m, r in spots.items()},
              "calibration": calibration,
              "crossover_file": str(out_path), "sha256": info["sha256"]}
    if cfg.data.eval_paths:
        report["evaluations"] = evaluations(out_path, cfg.data.eval_paths, session.device)
    ckio.atomic_write_text(json.dumps(report, indent=2, allow_nan=True) + "\n",
                           paths.checkpoints / f"crossover_report_{stamp}.json")
    ckio.atomic_write_text(format_report(report), paths.checkpoints / f"crossover_report_{stamp}.txt")
    gain = result["base_score"] - result["score"]
    log.info("crossover: val loss %.4f -> %.4f (gain %.4f); wrote %s", result["base_score"], result["score"], gain, out_path)
    return report


def crossover_command(args) -> int:
    """`redheart crossover RUN_DIR`: Sweet Spot and Crossover on a run's snapshots, with the config
    of its newest one (--set: sweetspot.* and crossover.* values); the result as JSON on stdout."""
    from redheart.runlog import setup_logging
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


def evaluations(checkpoint, specs: list[str], device: torch.device) -> list[dict[str, Any]]:
    """The crossover model on the run's evaluation data (`data.eval_paths`: Scruples dilemmas,
    or any data scored whole), as `redheart evaluate` prints it; a spec that fails is reported
    with its error instead (the run's results stand without it)."""
    from redheart.data.schema import DataError
    from redheart.evaluate import Scorer, evaluate_spec

    scorer = Scorer(checkpoint, str(device))
    out = []
    for spec in specs:
        try:
            out.append(evaluate_spec(scorer, spec))
        except (DataError, OSError) as exc:
            log.warning("evaluation data %s: %s", spec, exc)
            out.append({"data": spec, "error": str(exc)})
            continue
        r = out[-1]
        log.info("evaluation on %s: %s", spec, f"dilemmas accuracy {r['accuracy']:.4f} of {r['n']}" if r["kind"] == "dilemmas"
                 else f"loss {r['metrics']['loss']:.4f} on {r['records']} records")
    return out


def calibrate(model: torch.nn.Module, state: dict[str, torch.Tensor], session: Session, cfg: Config,
              dtype: torch.dtype | None) -> dict[str, Any] | None:
    """Temperature scaling of the crossover model's emotion shares: the temperature fitted on the
    validation split (`fit_temperature`), and the expected calibration error before and after on
    validation and test. None when validation has too few emotion targets to fit on."""
    model.load_state_dict(_as_float(state))
    preds, targets = {}, {}
    for split in ("val", "test"):
        data = session.data.splits[split]
        mask = data.emotion_mask
        if int(mask.sum()) < 2:
            continue
        preds[split] = predict_split(model, session.features[split], cfg.train.eval_batch, dtype)["emotion"][mask]
        targets[split] = data.emotion[mask]
    if "val" not in preds:
        return None
    t = fit_temperature(preds["val"], targets["val"])
    out: dict[str, Any] = {"emotion_temperature": t, "fitted_on": "val"}
    for split in preds:
        out[split] = {"ece_before": expected_calibration_error(preds[split], targets[split]),
                      "ece_after": expected_calibration_error(preds[split], targets[split], temperature=t),
                      "texts": len(preds[split])}
    log.info("calibration: emotion temperature %.3f (fitted on validation); ECE %s", t, ", ".join(
        f"{s} {out[s]['ece_before']:.4f} -> {out[s]['ece_after']:.4f}" for s in preds))
    return out


def format_report(report: dict[str, Any]) -> str:
    lines = [f"Parameter Crossover report: run {report['run_id']}",
             f"base: best single epoch {report['base_epoch']}; module sources: "
             + ", ".join(f"{m}={s}" for m, s in report["sources"].items()), ""]
    keys = [k for k, _ in heads.score_keys()]
    for split in ("val", "test"):
        lines.append(f"{split} scores")
        lines.append(f"{'model':<14}" + "".join(f"{k:>13}" for k in keys))
        for name, sc in report["scores"].items():
            row = sc.get(split) or {}
            lines.append(f"{name:<14}" + "".join(f"{row[k]:>13.4f}" if k in row else f"{'-':>13}" for k in keys))
        lines.append("")
    cal = report.get("calibration")
    if cal:
        lines.append(f"emotion calibration: temperature {cal['emotion_temperature']:.3f} (fitted on validation); "
                     "expected calibration error " + ", ".join(
                         f"{s} {cal[s]['ece_before']:.4f} -> {cal[s]['ece_after']:.4f}" for s in ("val", "test") if s in cal))
        lines.append("")
    for e in report.get("evaluations") or []:
        if "error" in e:
            lines.append(f"evaluation on {e['data']}: failed ({e['error']})")
        elif e["kind"] == "dilemmas":
            lines.append(f"evaluation on {e['data']}: accuracy {e['accuracy']:.4f} of {e['n']} dilemmas ({e['rule']}); "
                         f"{e['pairs_with_an_action_from_the_training_split']} pairs have an action from the training "
                         f"split, {e['accuracy_without_those']:.4f} without them")
        else:
            lines.append(f"evaluation on {e['data']}: " + ", ".join(f"{k} {v:.4f}" for k, v in e["metrics"].items()))
    if report.get("evaluations"):
        lines.append("")
    lines.append("trials (greedy, on validation loss):")
    for t in report["trials"]:
        lines.append(f"  {t['module'] or 'base':<9} {t['source']:<24} {t['score']:.4f} {'kept' if t['kept'] else 'rejected'}")
    return "\n".join(lines) + "\n"
