"""One training run, start to finish: open the run (fresh or resumed), build the session,
LR sweep, train, Sweet Spot and Crossover, summaries. The modes of `run_learning.sh` are
configurations of this one path."""
from __future__ import annotations

import json
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redheart.ckpt import io as ckio
from redheart.ckpt.state import RunPaths, find_resume_state, read_registry, timestamp
from redheart.config import Config
from redheart.runlog import Progress, setup_logging
from redheart.session import build_session
from redheart.train import memory
from redheart.train.trainer import StopFlag, Trainer, TrainingStopped

log = logging.getLogger("redheart")


class UsageError(RuntimeError):
    """A request that cannot be carried out as given (the message says what to do)."""


@dataclass
class RunOptions:
    resume: str | None = None  # PATH or "latest"
    restart: bool = False  # start afresh even if an unfinished run is in the output directory
    epochs_given: bool = False  # --epochs was on the command line (applies to a resumed run too)
    debug: bool = False
    verbose: bool = False
    analysis: bool = True  # Sweet Spot + Crossover after training
    faults: dict[str, Any] = field(default_factory=dict)  # test hooks (injected failures)


def open_run(cfg: Config, opts: RunOptions) -> tuple[Config, RunPaths, dict[str, Any] | None, dict[str, Any] | None]:
    """(config, paths, resume state or None, warm-start snapshot or None)."""
    root = Path(cfg.output_dir)
    if opts.resume:
        if opts.resume == "latest":
            state, _ = find_resume_state(root)
            path = None
        else:
            path = Path(opts.resume)
            known = {e["path"]: e.get("sha256") for e in read_registry(root)}
            known.update({e["path"]: e.get("sha256") for e in _metadata(root)})
            state = ckio.load(path, known.get(str(path)))
        saved = Config.from_dict(state["config"])
        saved.output_dir = cfg.output_dir
        saved.train.device = cfg.train.device
        if opts.epochs_given and cfg.train.epochs != saved.train.epochs:
            log.warning("--epochs %d on resume: the LR schedule is recomputed for the new length "
                        "(the continuation is no longer bit-identical)", cfg.train.epochs)
            saved.train.epochs = cfg.train.epochs
        paths = RunPaths(root, state["run_id"])
        if state.get("kind") == "resume":
            return saved.validate(), paths, state, None
        log.warning("%s is an epoch snapshot (weights only): training continues from its weights "
                    "with a fresh optimizer; for an exact resume use --resume latest", path)
        return saved.validate(), RunPaths(root, timestamp()), None, state
    registry = read_registry(root)
    if registry and not registry[-1].get("finished") and not opts.restart:
        raise UsageError(f"{root} holds an unfinished run ({registry[-1].get('run_id')}, epoch "
                         f"{registry[-1].get('epoch')}, step {registry[-1].get('global_step')}). "
                         f"Continue it with --resume latest, start anew with --restart, or use --output-dir")
    run_id = timestamp()
    while (root / "logs" / f"training_{run_id}.log").exists():
        run_id += "_1"
    return cfg, RunPaths(root, run_id), None, None


def _metadata(root: Path) -> list[dict[str, Any]]:
    try:
        return ckio.read_metadata(root / "checkpoints_final")
    except ckio.CheckpointError:
        return []


def install_signal_handlers(stop: StopFlag) -> None:
    """First SIGTERM/SIGINT: finish the current step, save, exit 75. Second: stop at once."""

    def handler(signum, _frame):
        stop.requested = True
        stop.signal_name = signal.Signals(signum).name
        log.warning("%s received: stopping after the current optimizer step with a resumable state "
                    "(send it again to stop at once)", stop.signal_name)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def start_summary(cfg: Config, paths: RunPaths, session, trainer: Trainer) -> str:
    counts = session.data.head_counts()
    est = memory.estimate(cfg, trainer.param_counts["total"])
    gpu = memory.device_memory_gib(session.device)
    lines = [
        f"Red Heart AI training run {paths.run_id}",
        f"  preset {cfg.preset}: {trainer.param_counts['total'] / 1e6:.1f}M trainable parameters ("
        + ", ".join(f"{m} {trainer.param_counts[m] / 1e6:.1f}M" for m in ("backbone", "emotion", "bentham", "regret", "surd")) + ")",
        f"  device {session.device}" + (f" ({gpu:.0f} GiB)" if gpu else "") + f", precision "
        f"{'bf16 autocast' if trainer.dtype is not None else 'fp32'}, estimated training memory {est['total_gib']:.1f} GiB",
        f"  data: " + "; ".join(f"{s} {c['records']} (emotion {c['emotion']}, bentham {c['bentham']}, regret {c['regret']}, surd {c['surd']})"
                                for s, c in counts.items()),
        f"  {cfg.train.epochs} epochs x {trainer.steps_per_epoch} optimizer steps; effective batch "
        f"{cfg.effective_batch} = micro-batch {cfg.train.micro_batch} x accumulation {cfg.train.grad_accum}",
        f"  techniques: label smoothing {cfg.tech.label_smoothing}, R-Drop alpha {cfg.tech.rdrop_alpha}, "
        f"EMA decay {cfg.tech.ema_decay}; LR sweep {'on' if cfg.sweep.enabled else 'off'}",
        f"  outputs under {paths.root}/ (log {paths.log_file.name}, metrics {paths.metrics_file.name})",
    ]
    return "\n".join(lines)


def end_summary(paths: RunPaths, history: list[dict[str, Any]], report: dict[str, Any] | None) -> str:
    last = history[-1]
    best = min(history, key=lambda r: r["val"]["loss"])
    lines = [f"Run {paths.run_id} finished: {len(history)} epochs",
             f"  final val loss {last['val']['loss']:.4f}"
             + (f", EMA {last['val_ema']['loss']:.4f}" if last.get("val_ema") else "")
             + f"; best val loss {best['val']['loss']:.4f} at epoch {best['epoch']}"]
    if report:
        sc = report["scores"]
        lines.append("  sweet spots: " + ", ".join(f"{m}@{e}" for m, e in report["sweet_spots"].items() if e))
        lines.append(f"  crossover val loss {sc['crossover']['val']['loss']:.4f} vs best epoch "
                     f"{sc['best_epoch']['val']['loss']:.4f}; sources: "
                     + ", ".join(f"{m}={s}" for m, s in report["sources"].items()))
        if sc["crossover"].get("test"):
            lines.append(f"  test loss: crossover {sc['crossover']['test']['loss']:.4f}, final epoch "
                         f"{sc['final_epoch']['test']['loss']:.4f}"
                         + (f", linear probe {sc['linear_probe']['test']['loss']:.4f}" if "linear_probe" in sc and "test" in sc["linear_probe"] else ""))
    lines.append(f"  files: {paths.checkpoints}/, {paths.root / 'sweet_spot_analysis'}/, {paths.log_file}")
    return "\n".join(lines)


def train(cfg: Config, opts: RunOptions) -> int:
    cfg, paths, state, warm = open_run(cfg, opts)
    paths.make()
    setup_logging(opts.debug, paths.log_file)
    if state is None:
        ckio.atomic_write_text(cfg.to_yaml(), paths.config_file)
    session = build_session(cfg)
    from redheart.tb import TensorBoard

    tb = TensorBoard(paths.tensorboard)
    stop = StopFlag()
    install_signal_handlers(stop)
    trainer = Trainer(cfg, paths, session.data, session.features, session.device, stop=stop,
                      faults=opts.faults, tensorboard=tb)
    log.info("\n%s", start_summary(cfg, paths, session, trainer))
    if state is not None:
        trainer.restore(state)
        log.info("resumed run %s at epoch %d, step %d (global step %d)", paths.run_id, trainer.epoch + 1,
                 trainer.step_in_epoch, trainer.global_step)
    elif warm is not None:
        trainer.model.load_state_dict({k: v.float() for k, v in warm["model_state"].items()})
        trainer.epoch = int(warm["epoch"])
        if trainer.ema is not None:
            trainer.ema.shadow = [p.detach().clone().float() for p in trainer.model.parameters()]
    elif cfg.sweep.enabled:
        from redheart.sweep import run_sweep, write_sweep

        result = run_sweep(trainer)
        jpath, ppath = write_sweep(result, paths.sweep, paths.run_id)
        trainer.set_lr(result["lr"])
        trainer.sweep_result = {"lr": result["lr"], "json": jpath, "plot": ppath, "reason": result["reason"]}
    progress = Progress(cfg.train.epochs, cfg.train.log_every, opts.verbose)
    try:
        history = trainer.fit(progress)
    except TrainingStopped as stopped:
        progress.close()
        log.error("%s", stopped.reason)
        if stopped.resume_path:
            log.error("resume with: bash run_learning.sh <mode> --resume %s   (or --resume latest)", stopped.resume_path)
        _write_side_files(trainer, paths)
        tb.close()
        return stopped.code
    _write_side_files(trainer, paths)
    # Training is complete and saved; a signal from here on ends the process at once (every
    # file is written atomically), and the analysis can be re-run with `redheart crossover`.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if stop.requested:
        log.warning("stop requested after the last step: Sweet Spot and Crossover skipped "
                    "(run them with: bash run_learning.sh crossover %s)", paths.root)
        tb.close()
        return 0
    report = None
    if opts.analysis and cfg.crossover.enabled:
        from redheart.analysis import run_crossover

        report = run_crossover(session, paths, history, paths.run_id)
    from redheart.plots import plot_training_curves

    plot_training_curves(history, paths.logs / f"training_curves_{paths.run_id}.png",
                         {m: {"epoch": e} for m, e in (report or {}).get("sweet_spots", {}).items()})
    tb.close()
    log.info("\n%s", end_summary(paths, history, report))
    return 0


def _write_side_files(trainer: Trainer, paths: RunPaths) -> None:
    if trainer.oom_events or trainer.micro_batch != trainer.cfg.train.micro_batch:
        paths.oom.mkdir(parents=True, exist_ok=True)
        doc = {"run_id": paths.run_id, "events": trainer.oom_events,
               "micro_batch": {"configured": trainer.cfg.train.micro_batch, "final": trainer.micro_batch},
               "swap_manager": trainer.cfg.memory.swap}
        ckio.atomic_write_text(json.dumps(doc, indent=2) + "\n", paths.oom / f"oom_stats_{paths.run_id}.json")
    if trainer.memory_samples:
        from redheart.plots import plot_memory

        ckio.atomic_write_text(json.dumps({"run_id": paths.run_id, "samples": trainer.memory_samples}, indent=1) + "\n",
                               paths.memory_file)
        plot_memory(trainer.memory_samples, paths.logs / f"memory_{paths.run_id}.png")
