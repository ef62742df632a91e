"""One training run, start to finish: open the run (fresh or resumed), build the session,
LR sweep, train, Sweet Spot and Crossover, summaries (`redheart.report`). The modes of
`run_learning.sh` are configurations of this one path (`redheart.config.MODES`)."""
from __future__ import annotations

import gc
import logging
import logging.handlers
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redheart import exitcodes, launch, resume_flags
from redheart.ckpt import io as ckio
from redheart.ckpt.lock import OutputDirBusy, OutputLock
from redheart.ckpt.state import RunPaths, adopt_orphans, find_resume_state, read_registry, set_aside, timestamp
from redheart.config import Config, ConfigError
from redheart.data.importers import LoadedData
from redheart.report import end_summary, report_stop, start_summary, write_side_files
from redheart.runlog import Progress, setup_logging
from redheart.session import build_session
from redheart.train.plan import preflight
from redheart.train.stopping import StopFlag, TrainingStopped
from redheart.train.trainer import Trainer

log = logging.getLogger("redheart")


REPEAT_GRACE_S = 1.0  # a repeat of the stop signal within this many seconds is the same request


class StopBeforeTraining(BaseException):
    """Raised by the signal handler while the run is still being set up. A BaseException, like
    KeyboardInterrupt, so that no library's `except Exception` on its way out swallows it."""


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
    mode: str = "unified-train"  # the run_learning.sh mode, for the "resume with" hint
    # config key -> the flag that set it on the command line (`resume_flags.asked_settings`): on
    # resume each is checked against the state, which keeps its settings
    asked: dict[str, str] = field(default_factory=dict)
    data: LoadedData | None = None  # the records, when the caller read them already


def open_run(cfg: Config, opts: RunOptions) -> tuple[Config, RunPaths, dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """(config, paths, resume state or None, warm-start snapshot or None, the file either came from)."""
    root = Path(cfg.output_dir)
    try:  # complete resume states that a kill left unregistered count as any other
        adopt_orphans(root)
    except ckio.CheckpointError as exc:  # the registry could not be written: find_resume_state still sees them
        log.warning("%s", exc)
    if opts.resume:
        if opts.resume == "latest":
            skipped: list[dict[str, Any]] = []
            state, entry = find_resume_state(root, skipped)
            set_aside(root, skipped)
            path = Path(entry["path"])
        else:
            path = Path(opts.resume)
            if path.is_dir():
                raise UsageError(f"--resume {path}: a folder; give a checkpoint file, or --resume latest "
                                 f"with --output-dir for the newest resume state of an output directory")
            try:
                state = ckio.load(path, recorded_sha256(path))
            except ckio.CheckpointError as exc:
                raise ckio.CheckpointError(f"{exc} (--resume latest takes the newest sound resume state)") from None
            check_resumable(state, path)
        saved = Config.from_dict(state["config"])
        found = resume_flags.conflicts(saved, cfg, opts.asked)
        if found:
            shown = f"latest ({path})" if opts.resume == "latest" else str(path)
            raise UsageError(resume_flags.conflict_message(shown, state.get("run_id", "?"), found))
        resume_flags.take_changeable(saved, cfg, opts.asked)
        saved.output_dir = cfg.output_dir
        saved.train.device = cfg.train.device
        saved.train.parallel = cfg.train.parallel  # how this launch shares the work, like --gpus
        if opts.epochs_given and cfg.train.epochs != saved.train.epochs:
            log.warning("--epochs %d on resume: the LR schedule is recomputed for the new length "
                        "(the continuation is no longer bit-identical)", cfg.train.epochs)
            saved.train.epochs = cfg.train.epochs
        paths = RunPaths(root, state["run_id"])
        if state.get("kind") == "resume":
            return saved.validate(), paths, state, None, str(path)
        log.warning("%s is an epoch snapshot (weights only): training continues from its weights "
                    "with a fresh optimizer; for an exact resume use --resume latest", path)
        return saved.validate(), RunPaths(root, timestamp()), None, state, str(path)
    registry = read_registry(root)
    if registry and not registry[-1].get("finished") and not opts.restart:
        raise UsageError(f"{root} holds an unfinished run ({registry[-1].get('run_id')}, epoch "
                         f"{registry[-1].get('epoch')}, step {registry[-1].get('global_step')}). "
                         f"Continue it with --resume latest, start anew with --restart, or use --output-dir")
    run_id = timestamp()
    while (root / "logs" / f"training_{run_id}.log").exists():
        run_id += "_1"
    return cfg, RunPaths(root, run_id), None, None, None


# What `Trainer.restore` reads of a resume state, and a warm start of a snapshot.
RESUME_KEYS = ("run_id", "config", "model_state", "optimizer", "scheduler", "ema", "epoch", "step_in_epoch",
               "global_step", "micro_batch", "lr", "history", "epoch_stats", "bad_steps_total",
               "bad_steps_in_row", "oom_events", "finished")
SNAPSHOT_KEYS = ("run_id", "config", "model_state", "epoch")


def check_resumable(state: dict[str, Any], path: Path) -> None:
    """A checkpoint given to --resume: a resume state (an exact continuation) or an epoch snapshot
    (a start from its weights); anything else is refused saying what it is and what it is for."""
    kind = state.get("kind")
    if kind == "crossover":
        raise UsageError(
            f"--resume {path}: this is the Parameter Crossover model (modules taken from several epochs' "
            f"snapshots), a finished model, not a point of a training run: it cannot be resumed. Use it for "
            f"predictions: bash run_learning.sh predict --checkpoint {path} \"some text\". To train on, give "
            f"--resume latest (or a resume_state_*.pt) for an exact continuation, or an epoch snapshot "
            f"(checkpoint_epoch_*.pt) to start from its weights")
    need = RESUME_KEYS if kind == "resume" else SNAPSHOT_KEYS if kind == "snapshot" else None
    if need is None:
        raise ckio.CheckpointError(f"{path} is not a resume state or an epoch snapshot of this system (its kind: "
                                   f"{kind!r}): --resume takes one of those (--resume latest: the newest resume "
                                   f"state of --output-dir)")
    missing = [k for k in need if k not in state]
    if missing or not isinstance(state["config"], dict):
        raise ckio.CheckpointError(f"{path} is not a complete {kind} (missing: {', '.join(missing) or 'config'}): "
                                   f"it cannot be resumed")


def lock_output_dir(cfg: Config, held: list[OutputLock]) -> None:
    """The output directory's lock (`redheart.ckpt.lock`), taken before the run reads the
    directory and held until `train` returns; appended to `held`."""
    try:
        held.append(OutputLock.acquire(cfg.output_dir))
    except OutputDirBusy as exc:
        raise UsageError(str(exc)) from None


def open_run_everywhere(cfg: Config, opts: RunOptions, world, held: list[OutputLock]) -> tuple[
        Config, RunPaths, dict[str, Any] | None, dict[str, Any] | None]:
    """open_run on rank 0 (it may set damaged files aside), holding the output directory's lock
    (appended to `held`); the other ranks take its decision (config, run id, the file to start
    from) and load that file themselves."""
    from redheart import dist as rdist

    if not world.active:
        lock_output_dir(cfg, held)
        return open_run(cfg, opts)[:4]
    if world.main:
        try:
            lock_output_dir(cfg, held)
            cfg, paths, state, warm, source = open_run(cfg, opts)
        except Exception as exc:
            rdist.broadcast({"error": str(exc)}, world)
            raise
        rdist.broadcast({"config": cfg.to_dict(), "run_id": paths.run_id, "source": source,
                         "warm": warm is not None}, world)
        return cfg, paths, state, warm
    told = rdist.broadcast(None, world)
    if "error" in told:
        raise SystemExit(exitcodes.USAGE)  # rank 0 says what went wrong
    device = cfg.train.device
    cfg = Config.from_dict(told["config"])
    cfg.train.device = device
    cfg.validate()
    loaded = ckio.load(told["source"], None) if told["source"] else None
    warm = loaded if told["warm"] else None
    return cfg, RunPaths(Path(cfg.output_dir), told["run_id"]), None if told["warm"] else loaded, warm


def recorded_sha256(path: Path) -> str | None:
    """The checksum recorded for a checkpoint in the lists beside it (metadata.json,
    resume_states.json), or None, said in the log, when it is in neither."""
    folder, target = path.parent, path.resolve()
    entries: list[dict[str, Any]] = read_registry(folder.parent) if folder.name == "checkpoints_final" else []
    try:
        entries += ckio.read_metadata(folder)
    except ckio.CheckpointError as exc:
        log.warning("%s", exc)
    for e in entries:
        if Path(e["path"]).resolve() == target and e.get("sha256"):
            return e["sha256"]
    log.warning("%s is not listed in %s/metadata.json or resume_states.json: its checksum cannot be verified",
                path, folder)
    return None


def install_signal_handlers(stop: StopFlag, training: Callable[[], bool], between_micro_batches: bool = True) -> None:
    """First SIGTERM/SIGINT while training: stop before the next micro-batch (one process: the
    step under way is left and redone on resume) or after the current optimizer step (several
    ranks stop together), save a resumable state, exit 75. Before training has begun (setup, LR sweep) nothing new would be saved, so it
    stops at once, also with 75. A second signal ends the process at once, unless it comes within
    REPEAT_GRACE_S of the first: GNU `timeout` sends its signal twice (to the child, then to its
    process group), and that must not turn a clean stop into a kill."""
    first: list[float] = []

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        if first:
            if time.monotonic() - first[0] < REPEAT_GRACE_S:
                return
            log.warning("%s received again: stopping at once", name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        first.append(time.monotonic())
        stop.requested = True
        stop.signal_name = name
        if not training():
            raise StopBeforeTraining(name)
        if between_micro_batches:
            log.warning("%s received: stopping before the next micro-batch, with a resumable state as of the last "
                        "completed optimizer step (send it again to stop at once)", name)
        else:
            log.warning("%s received: stopping after the current optimizer step with a resumable state "
                        "(send it again to stop at once)", name)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def clean_leftovers(paths: RunPaths) -> None:
    """Temporary files of writes cut short by a kill are never read; remove them."""
    removed = []
    for folder in (paths.checkpoints, paths.logs, paths.sweep, paths.sweetspot, paths.oom):
        removed += ckio.clean_stale_temp(folder)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write: %s", len(removed),
                 ", ".join(p.name for p in removed))


def check_disk_space(trainer: Trainer, paths: RunPaths) -> None:
    """Refuse (WriteFailed, reported) before training when the checkpoints folder cannot hold
    the run's first saves: a resume state (weights, AdamW moments, EMA) and a snapshot, beyond
    the margin every save keeps; a run that could save nothing would train for nothing."""
    params = trainer.param_counts["total"]
    cfg = trainer.cfg
    state = params * 4 * (3 + (1 if trainer.ema is not None else 0))
    snapshot = params * (2 if cfg.train.snapshot_dtype == "bf16" else 4)
    need = state + snapshot + ckio.SAVE_MARGIN_BYTES
    free = ckio.free_bytes(paths.checkpoints)
    if free is not None and free < need:
        raise ckio.report_write_failure(ckio.WriteFailed(
            paths.checkpoints, f"not enough disk space for this run's checkpoints: {ckio.human_bytes(free)} free in "
            f"{paths.checkpoints}, {ckio.human_bytes(need)} needed before training starts (a resume state of "
            f"{ckio.human_bytes(state)}, a snapshot of {ckio.human_bytes(snapshot)} and "
            f"{ckio.human_bytes(ckio.SAVE_MARGIN_BYTES)} kept free)", need, free))


def train(cfg: Config, opts: RunOptions) -> int:
    """Run (or resume) training and the analysis; returns the exit code. The signal handlers
    and test faults it installs are taken away again when it returns.

    Under torchrun (WORLD_SIZE > 1) every process runs this: each trains on its share of every
    optimizer step; rank 0 alone writes files and runs the analysis.
    """
    from redheart import dist as rdist

    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    world = rdist.from_env()
    held: list[OutputLock] = []  # the output directory's lock (rank 0)
    try:
        if world.active:
            cfg = _join_world(cfg, world)
        code = _train(cfg, opts, world, held)
        if world.main:
            launch.tell_launcher(code)
        return code
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
        ckio.set_faults({})
        ckio.on_write_failure(None)
        rdist.shutdown()
        for lock in held:
            lock.release()


def _join_world(cfg: Config, world) -> Config:
    """This process's device (GPU local_rank, or the CPU with gloo) and the process group."""
    import torch

    from redheart import dist as rdist
    from redheart.train.plan import pick_device

    device = pick_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
        cfg.train.device = f"cuda:{world.local_rank}"
    rdist.init(world, device.type)
    return cfg


def _train(cfg: Config, opts: RunOptions, world, held: list[OutputLock]) -> int:
    ckio.set_faults(opts.faults)
    setup_logging(opts.debug)  # the console, for what opening the run has to say (skipped states, ...)
    if not world.main:
        log.setLevel(logging.ERROR)  # rank 0 speaks for all; the others only of their own failures
    early = logging.handlers.BufferingHandler(10_000)
    log.addHandler(early)
    try:
        preflight(cfg)
        cfg, paths, state, warm = open_run_everywhere(cfg, opts, world, held)
    finally:
        log.removeHandler(early)
    if world.main:
        paths.make()
        setup_logging(opts.debug, paths.log_file)
        for handler in log.handlers:  # ... and into the log file once it is known
            if isinstance(handler, logging.FileHandler):
                for record in early.buffer:
                    handler.handle(record)
        clean_leftovers(paths)
    stop = StopFlag()
    training = [False]
    install_signal_handlers(stop, lambda: training[0], between_micro_batches=not world.active)

    def write_failed(exc: ckio.WriteFailed) -> None:  # the one rule of a failed write: the run stops
        if stop.write_failure is None:
            stop.write_failure = exc
        if not stop.requested:
            stop.requested, stop.signal_name = True, "a failed write"

    ckio.on_write_failure(write_failed)
    trainer = tb = None
    try:
        if state is None and world.main:
            _written(lambda: ckio.atomic_write_text(cfg.to_yaml(), paths.config_file), "config")
        session = build_session(cfg, opts.data)
        opts.data = None  # the splits hold what training needs
        probe = _micro_batch_probe(cfg, session, opts, world, paths, resuming=state is not None)
        from redheart.tb import TensorBoard

        tb = TensorBoard(paths.tensorboard) if world.main else None
        trainer = Trainer(cfg, paths, session.data, session.features, session.device, stop=stop,
                          faults=opts.faults, tensorboard=tb, world=world)
        trainer.memory_probe = probe
        if world.main:
            log.info("\n%s", start_summary(cfg, paths, session, trainer))
            check_disk_space(trainer, paths)
        if state is not None:
            _fitting(lambda: trainer.restore(state), f"the resume state of run {paths.run_id}")
            log.info("resumed run %s at epoch %d, step %d (global step %d)", paths.run_id, trainer.epoch + 1,
                     trainer.step_in_epoch, trainer.global_step)
        elif warm is not None:
            _fitting(lambda: trainer.load_weights({k: v.float() for k, v in warm["model_state"].items()}),
                     f"the epoch snapshot of run {warm.get('run_id')}")
            trainer.epoch = int(warm["epoch"])
        elif cfg.sweep.enabled:
            from redheart.sweep import run_sweep, write_sweep

            result = run_sweep(trainer)
            jpath = ppath = None
            if world.main:  # not written: the run stops at its first step, keeping the sweep's choice
                jpath, ppath = _written(lambda: write_sweep(result, paths.sweep, paths.run_id), "LR sweep") or (None, None)
            trainer.set_lr(result["lr"])
            trainer.sweep_result = {"lr": result["lr"], "json": jpath, "plot": ppath, "reason": result["reason"]}
        progress = Progress(cfg.train.epochs, cfg.train.log_every, opts.verbose, quiet=not world.main)
        training[0] = True
        try:
            history = trainer.fit(progress)
        finally:
            progress.close()
    except (TrainingStopped, StopBeforeTraining, ckio.WriteFailed) as exc:
        if isinstance(exc, TrainingStopped):
            stopped = exc
        elif isinstance(exc, ckio.WriteFailed):  # before training, or a write of its own (a profiled step)
            stopped = TrainingStopped("stopped: a file could not be written" + (
                "" if training[0] else " before training began"), None, code=exitcodes.STOPPED)
        else:
            stopped = TrainingStopped(f"stopped by {exc} before training began", None, code=exitcodes.STOPPED)
        if world.main:
            if trainer is not None:
                write_side_files(trainer, paths)
            if tb is not None:
                tb.close()
            report_stop(stopped, paths, opts.mode, stop.write_failure)
        return stopped.code
    if not world.main:  # the analysis runs on rank 0 alone
        return 0
    handed, trainer = [trainer], None  # _after_training lets go of the training state before the analysis
    try:
        return _after_training(cfg, opts, paths, session, handed, history, tb, stop)
    except ckio.WriteFailed:
        tb.close()
        log.error("training is complete and saved, but the analysis after it stopped: a file could not be "
                  "written: %s", stop.write_failure)
        log.error("free space there, then run it again: bash run_learning.sh crossover %s (or: bash "
                  "run_learning.sh %s --resume latest)", paths.root, opts.mode)
        return exitcodes.STOPPED


def _written(write: Callable[[], Any], what: str) -> Any:
    """A write whose failure is reported (`ckio.report_write_failure`: the run stops at its
    first step) without ending the setup; None when it failed."""
    try:
        return write()
    except ckio.WriteFailed as exc:
        log.error("%s not written: %s", what, exc)
        return None


def _after_training(cfg: Config, opts: RunOptions, paths: RunPaths, session, handed: list[Trainer],
                    history: list[dict[str, Any]], tb, stop: StopFlag) -> int:
    """Rank 0 after training: the side files, then Sweet Spot, Crossover and the curves, and the
    summary (`handed`: the trainer, the one reference to it). A failed write here raises
    ckio.WriteFailed (the caller says what to do)."""
    trainer = handed.pop()
    write_side_files(trainer, paths)
    if stop.write_failure is not None:
        raise stop.write_failure
    # Training is complete and saved; a signal from here on ends the process at once (every
    # file is written atomically), and the analysis can be re-run with `redheart crossover`.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if not history:  # a warm start from a snapshot of the last epoch
        log.warning("nothing to train: the weights are at epoch %d of %d (give --epochs N to train further)",
                    trainer.epoch, cfg.train.epochs)
        tb.close()
        return 0
    if stop.requested:
        log.warning("stop requested after the last step: Sweet Spot and Crossover skipped "
                    "(run them with: bash run_learning.sh crossover %s)", paths.root)
        tb.close()
        if stop.write_failure is not None:
            raise stop.write_failure
        return 0
    # The analysis reads the saved snapshots: the training state (the model, its gradients, the
    # AdamW moments and the EMA: 16 GB for an 800M model in fp32) goes first. Kept, it took the
    # CPU analysis of unified-test-v1 past 24 GB and into the out-of-memory killer.
    trainer = None
    gc.collect()
    report = None
    if opts.analysis and cfg.crossover.enabled:
        from redheart.analysis import run_crossover

        report = run_crossover(session, paths, history, paths.run_id)
    from redheart.plots import plot_training_curves

    plot_training_curves(history, paths.logs / f"training_curves_{paths.run_id}.png",
                         {m: {"epoch": e} for m, e in (report or {}).get("sweet_spots", {}).items()})
    tb.close()
    if stop.write_failure is not None:  # one the analysis or TensorBoard reported without raising
        raise stop.write_failure
    log.info("\n%s", end_summary(paths, history, report))
    return 0


def _fitting(load: Callable[[], None], what: str) -> None:
    """Load a checkpoint into the trainer, a file that does not fit the model of its own config
    (put together elsewhere) said as such instead of an internal error."""
    import torch

    try:
        load()
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ckio.CheckpointError(f"{what} does not fit the model and optimizer of its own config: {first}") from None


def _micro_batch_probe(cfg: Config, session, opts: RunOptions, world, paths: RunPaths,
                       resuming: bool) -> dict[str, Any] | None:
    """`--batch-size auto`: the largest micro-batch that fits, the accumulation recomputed, and
    the config file rewritten with it (a resume then trains as this run did); train-local: the
    same search for its closing summary. Before the trainer exists, so the GPU is still empty."""
    auto = cfg.train.auto_micro_batch and not resuming
    if not (auto or cfg.memory.monitor) or (world.active and not auto):
        return None
    if world.active:
        raise ConfigError("--batch-size auto: one process only (each rank would measure alone); give "
                          "--batch-size N with --gpus")
    from redheart.train.autobatch import largest_micro_batch, with_micro_batch

    probe = largest_micro_batch(cfg, session.features["train"], session.device, opts.faults)
    if auto:
        with_micro_batch(cfg, probe["micro_batch"])
        cfg.train.auto_micro_batch = False
        log.info("--batch-size auto: micro-batch %d x accumulation %d (%s)", cfg.train.micro_batch,
                 cfg.train.grad_accum, probe["how"])
        ckio.atomic_write_text(cfg.to_yaml(), paths.config_file)
    return probe
