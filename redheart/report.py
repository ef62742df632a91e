"""What a run reports: the screen before training and the one after it, the way on after a
stop, and the records of its out-of-memory events and memory samples (written at its end).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from redheart import heads
from redheart.ckpt import io as ckio
from redheart.ckpt.state import RunPaths, read_registry
from redheart.config import Config
from redheart.runlog import duration
from redheart.train import memory
from redheart.train.stopping import TrainingStopped
from redheart.train.trainer import Trainer

log = logging.getLogger("redheart")


def start_summary(cfg: Config, paths: RunPaths, session, trainer: Trainer) -> str:
    """One screen before training: model, device and memory, data per head, the schedule, outputs."""
    counts = session.data.head_counts()
    pc = trainer.param_counts
    est = memory.estimate(cfg, pc["total"], **trainer.memory_profile)
    gpu = memory.device_memory_gib(session.device)
    t = cfg.train
    sources = ", ".join(cfg.data.paths) if cfg.data.paths else "the shipped sample dataset"
    lr = (f"peak LR chosen by the LR sweep ({cfg.sweep.points} rates in [{cfg.sweep.lr_min:.0e}, "
          f"{cfg.sweep.lr_max:.0e}])" if cfg.sweep.enabled else f"peak LR {t.lr:.1e}")
    lines = [
        f"Red Heart AI training run {paths.run_id}",
        f"  model     preset {cfg.preset}: {pc['total'] / 1e6:.1f}M trainable parameters ("
        + ", ".join(f"{m} {pc[m] / 1e6:.1f}M" for m in heads.modules()) + ")",
        f"  device    {session.device}" + (f" ({gpu:.1f} GiB)" if gpu else "")
        + f", {'bf16 autocast' if trainer.dtype is not None else 'fp32'}; estimated training memory "
        f"{est['total_gib']:.1f} GiB" + (f" of {gpu:.1f}" if gpu else ""),
        f"  data      {sources}",
        f"            {'split':<6}{'records':>9}" + "".join(f"{h:>9}" for h in heads.names()),
        *(f"            {s:<6}{c['records']:>9}" + "".join(f"{c[h]:>9}" for h in heads.names())
          for s, c in counts.items()),
        f"  training  {t.epochs} epochs x {trainer.steps_per_epoch} optimizer steps; effective batch "
        f"{cfg.effective_batch} = micro-batch {t.micro_batch} x accumulation {t.grad_accum}; {lr}, "
        f"warm-up {t.warmup_ratio:.0%} then cosine",
        f"            label smoothing {cfg.tech.label_smoothing}, R-Drop alpha {cfg.tech.rdrop_alpha}, "
        f"EMA decay {cfg.tech.ema_decay}; a snapshot every {t.save_every} epoch(s), at most {t.keep_checkpoints} kept",
        f"  outputs   {paths.checkpoints}/",
        f"            {paths.log_file}",
        f"            {paths.metrics_file}",
        f"            TensorBoard: tensorboard --logdir {paths.logs}",
    ]
    return "\n".join(lines)


def end_summary(paths: RunPaths, history: list[dict[str, Any]], report: dict[str, Any] | None) -> str:
    """One screen after training: each validation metric (final, best and its epoch, EMA), the
    sweet spots, what the crossover gained, and where every file is."""
    last = history[-1]
    ema = last.get("val_ema") or {}
    lines = [f"Run {paths.run_id} finished: {len(history)} epochs, {last['global_step']} optimizer steps, "
             f"{duration(sum(r.get('seconds', 0) for r in history))} of training",
             f"  {'validation':<13}{'final':>9}{'best':>9}{'epoch':>7}{'EMA final':>11}"]
    for key, higher in heads.score_keys(summary_only=True):
        pts = [(r["val"][key], r["epoch"]) for r in history if math.isfinite(r["val"].get(key, math.nan))]
        if not pts:
            continue
        value, epoch = (max if higher else min)(pts, key=lambda p: p[0])
        final = last["val"].get(key, math.nan)
        lines.append(f"  {key:<13}{final:>9.4f}{value:>9.4f}{epoch:>7}"
                     + (f"{ema[key]:>11.4f}" if key in ema else ""))
    lines += collapse_lines(history)
    files = [("training curves", paths.logs / f"training_curves_{paths.run_id}.png"),
             ("LR sweep", paths.sweep / f"lr_sweep_plot_{paths.run_id}.png")]
    if report:
        sc = report["scores"]
        spots = report["sweet_spots"]
        lines.append("  sweet spots (epoch): " + ", ".join(f"{m} {e if e is not None else '-'}" for m, e in spots.items()))
        gain = sc["best_epoch"]["val"]["loss"] - sc["crossover"]["val"]["loss"]
        lines.append(f"  crossover: val loss {sc['crossover']['val']['loss']:.4f} vs {sc['best_epoch']['val']['loss']:.4f} "
                     f"for the best epoch {report['base_epoch']} (gain {gain:+.4f}); modules from "
                     + ", ".join(f"{m}={s}" for m, s in report["sources"].items()))
        cal = report.get("calibration")
        if cal:
            lines.append(f"  emotion calibration: temperature {cal['emotion_temperature']:.3f} (fitted on validation); "
                         + ", ".join(f"{s} ECE {cal[s]['ece_before']:.4f} -> {cal[s]['ece_after']:.4f}"
                                     for s in ("val", "test") if s in cal))
        for e in report.get("evaluations") or []:
            if e.get("kind") == "dilemmas":
                lines.append(f"  dilemmas: accuracy {e['accuracy']:.4f} of {e['n']} ({e['data']}; "
                             f"{e['accuracy_without_those']:.4f} without the "
                             f"{e['pairs_with_an_action_from_the_training_split']} with an action from the training split)")
        if sc["crossover"].get("test"):
            lines.append("  test loss: " + ", ".join(
                f"{name.replace('_', ' ')} {sc[name]['test']['loss']:.4f}"
                for name in ("crossover", "best_epoch", "final_epoch", "ema", "linear_probe")
                if (sc.get(name) or {}).get("test")))
        files = [("final model", Path(report["crossover_file"])),
                 ("crossover report", paths.checkpoints / f"crossover_report_{paths.run_id}.txt"),
                 ("sweet spots", paths.sweetspot / f"sweet_spot_report_{paths.run_id}.txt"),
                 ("sweet spot plots", paths.sweetspot / "plots"), *files]
    files += [("checkpoints", paths.checkpoints / "metadata.json"), ("log", paths.log_file),
              ("metrics", paths.metrics_file), ("TensorBoard", paths.tensorboard)]
    lines.append("  files:")
    lines += [f"    {name:<17}{path}" for name, path in files if path.exists()]
    if report:
        lines.append(f"  use it: bash run_learning.sh predict --checkpoint {report['crossover_file']} \"some text\"")
    return "\n".join(lines)


def collapse_lines(history: list[dict[str, Any]]) -> list[str]:
    """The summary's word on heads whose validation predictions collapsed: at which epochs, and
    why at the last of them."""
    epochs: dict[str, list[int]] = {}
    why: dict[str, str] = {}
    for r in history:
        for head, reason in (r.get("collapsed") or {}).items():
            epochs.setdefault(head, []).append(r["epoch"])
            why[head] = reason
    return [f"  WARNING: the {head} head collapsed at epoch{'s' if len(e) > 1 else ''} {', '.join(map(str, e))}: "
            f"{why[head]}" for head, e in epochs.items()]


def report_stop(stopped: TrainingStopped, paths: RunPaths, mode: str, failure: Exception | None = None) -> None:
    log.error("%s", stopped.reason)
    first = ""
    if failure is not None:  # a failed write stopped the run: which file, how much space, then how to go on
        log.error("the run stopped because a file could not be written: %s", failure)
        space = getattr(failure, "no_space", False)
        first = "free space there (or move the output directory to a larger disk), then " if space else \
            "make that folder writable, then "
    if stopped.resume_path:
        log.error("%sresume with: bash run_learning.sh %s --resume %s   (or --resume latest)", first, mode,
                  stopped.resume_path)
        return
    entries = [e for e in read_registry(paths.root) if Path(e["path"]).is_file()]
    if entries:
        log.error("no new resumable state was written; the last complete one is %s: %sresume with: "
                  "bash run_learning.sh %s --resume latest", entries[-1]["path"], first, mode)
    else:
        log.error("nothing to resume: no training state was saved yet; %srun the command again", first)


def write_side_files(trainer: Trainer, paths: RunPaths) -> None:
    """The OOM and memory records; a failure to write them (a full disk) is logged, not fatal."""
    try:
        _side_files(trainer, paths)
    except ckio.CheckpointError as exc:
        log.error("%s", exc)


def _side_files(trainer: Trainer, paths: RunPaths) -> None:
    if trainer.oom_events or trainer.micro_batch != trainer.cfg.train.micro_batch:
        paths.oom.mkdir(parents=True, exist_ok=True)
        history = [{"step": 0, "micro_batch": trainer.cfg.train.micro_batch}] + [
            {"step": e["step"], "micro_batch": e["micro_batch_after"]} for e in trainer.oom_events]
        doc = {"run_id": paths.run_id, "events": trainer.oom_events, "batch_size_history": history,
               "micro_batch": {"configured": trainer.cfg.train.micro_batch, "final": trainer.micro_batch},
               "effective_batch": trainer.cfg.effective_batch,
               "swap_manager": {"setting": trainer.cfg.memory.swap, "on": trainer.swap},
               "activation_checkpointing": trainer.checkpointing,
               "memory_samples": trainer.memory_samples or [e["memory"] for e in trainer.oom_events]}
        ckio.atomic_write_text(json.dumps(doc, indent=2) + "\n", paths.oom / f"oom_stats_{paths.run_id}.json")
    if trainer.memory_samples:
        from redheart.plots import plot_memory

        doc = {"run_id": paths.run_id, "samples": trainer.memory_samples}
        probe = trainer.memory_probe
        if probe is not None:
            from redheart.train.autobatch import memory_summary

            text, doc["summary"] = memory_summary(probe, trainer.memory_samples, trainer.cfg, trainer.device)
            log.info("\n%s", text)
        ckio.atomic_write_text(json.dumps(doc, indent=1) + "\n", paths.memory_file)
        plot_memory(trainer.memory_samples, paths.logs / f"memory_{paths.run_id}.png")
