"""The training loop. It reads top to bottom:

    for each epoch: for each optimizer step of the epoch's plan:
        step: forward/backward over the step's micro-batches (`MicroSteps`) -> clip -> AdamW ->
              schedule -> EMA (`Update`)
    then: evaluate (raw and EMA) -> record (metrics, TensorBoard) -> save (snapshot, resume
          state) -> prune (`Checkpoints`)

The trainer settles the run's plan once (`plan.py`: device, precision, the `auto` switches),
builds the components from it and keeps the loop's position (epoch, step, history); the
micro-batch sizes are `batching.MicroBatching`'s, which an out-of-memory retry halves (`oom.py`).
Test faults reach the loop only through its `Faults` (`faults.py`). Everything the loop needs to
continue exactly is in `resume_state()`; `restore()` puts it back.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import time
from typing import Any

import torch

from redheart.ckpt import io as ckio
from redheart.ckpt.rebuild import rebuild_initial_weights, weights_fingerprint
from redheart.ckpt.state import RunPaths, capture_rng, iso_now, restore_rng
from redheart.config import Config
from redheart.data.dataset import epoch_plan, micro_batches, shares
from redheart.data.features import FeatureSource
from redheart.data.pipeline import DataBundle
from redheart.dist import World, any_rank, data_parallel_grads, gathered, shard_like, shard_optimizer_state
from redheart.model.modules import count_parameters
from redheart.model.network import RedHeartNet
from redheart.runlog import log_epoch
from redheart.train import memory
from redheart.train.batching import MicroBatching
from redheart.train.checkpoints import Checkpoints, model_state, snapshot_weights
from redheart.train.ema import EMA
from redheart.train.evaluation import evaluate, validation
from redheart.train.faults import injected
from redheart.train.flops import measure_peak_tflops, train_flops
from redheart.train.microsteps import MicroSteps
from redheart.train.oom import oom_action
from redheart.train.plan import (checkpointing_on, measure_heaviest, prepare_model, set_checkpointing, settle_plan,
                                 write_plan)
from redheart.train.step import towers_run
from redheart.train.stopping import StepAbandoned, StopFlag, TrainingStopped
from redheart.train.swap import SwapAdamW
from redheart.train.update import StepStats, Update

log = logging.getLogger("redheart")


class Trainer:
    def __init__(self, cfg: Config, paths: RunPaths, data: DataBundle, features: dict[str, FeatureSource],
                 device: torch.device, stop: StopFlag | None = None, faults: dict[str, Any] | None = None,
                 tensorboard=None, world: World | None = None):
        self.cfg, self.paths, self.data, self.features, self.device = cfg, paths, data, features, device
        self.stop, self.faults, self.tb = stop or StopFlag(), injected(faults), tensorboard
        self.train_data, self.world = data.splits["train"], world or World()
        torch.manual_seed(cfg.train.seed)
        with device:  # initialise on the device itself (a 730M init on the CPU takes many seconds)
            self.model = RedHeartNet(cfg.model)
        self.param_counts = count_parameters(self.model)
        params = self.param_counts["total"]
        self.memory_profile = memory.data_profile(
            self.train_data.lengths.tolist(), self.train_data.head_counts(),
            sum(f.flat.numel() * f.flat.element_size() for f in features.values() if f.cached))
        self.plan = settle_plan(cfg, device, self.world, params, self.memory_profile, lambda: measure_heaviest(
            self.model, cfg, features["train"], self.train_data, device, params))
        self.dtype = self.plan.dtype
        prepare_model(self.model, self.plan, cfg, self.world)
        self.flat_grads, self.ready = data_parallel_grads(self.model, self.world, self.plan.fsdp,
                                                          self.plan.overlap_grad_reduce, self.plan.cuda_graphs)
        self.batches = MicroBatching.of(cfg.train.micro_batch, cfg.train.micro_batch_tokens)
        self.micro = MicroSteps(self.model, cfg, self.plan, device, features["train"], self.train_data, self.ready,
                                self.stop, self.faults)
        self.steps_per_epoch = math.ceil(len(self.train_data) / cfg.effective_batch)
        self.update = Update(self.model, cfg, self.plan, device, self.world, self.stop, self.faults,
                             cfg.train.epochs * self.steps_per_epoch, self.flat_grads, self.ready, self.micro.holds_grads)
        self.plan.deferred_checks = self.update.defers_checks()
        log.info("plan: %s", self.plan.summary())
        self.ckpt = Checkpoints(paths, cfg, self.world)
        self.epoch = self.step_in_epoch = self.global_step = 0  # epochs done, steps done of the epoch and in all
        self.step_counts, self.step_heads = {}, None  # the step under way's head counts, and the towers it runs
        self.history, self.oom_events, self.memory_samples = [], [], []
        self.memory_probe = self.sweep_result = None  # the largest micro-batch search (train-local); the LR sweep
        self.finished, self.initial_weights = False, True  # the latter: still the seed's (`resume_state`)
        self._epoch_t0 = time.time()
        # the bf16 matrix-product rate of this GPU, measured once: the denominator of MFU
        self.peak_tflops = measure_peak_tflops(device) if device.type == "cuda" else None
        torch.manual_seed(cfg.train.seed + 1 + self.world.rank)  # the dropout stream of training proper

    # ------------------------------------------------------------------ the components' state, as read outside

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.update.optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        return self.update.scheduler

    @property
    def ema(self) -> EMA | None:
        return self.update.ema

    @property
    def epoch_stats(self) -> StepStats:
        return self.update.stats

    @property
    def swap(self) -> bool:
        return self.update.swap

    @property
    def micro_batch(self) -> int:
        return self.batches.size

    @property
    def checkpointing(self) -> bool:
        return checkpointing_on(self.model)

    # ------------------------------------------------------------------ one optimizer step

    def accumulate(self, step: list[int]) -> dict[str, torch.Tensor]:
        """Forward and backward over one optimizer step's samples (this rank's share), cut into
        micro-batches; OOM errors are retried with a smaller micro-batch on the same samples."""
        counts = self.train_data.head_counts(step)
        self.step_counts, self.step_heads = counts, towers_run(counts)
        lengths = self.train_data.lengths
        every = self.shares(step)  # every rank's, so FSDP knows the busiest
        mine = every[self.world.rank]
        rng = capture_rng()  # for a retry after an OOM and for a step abandoned by a stop request
        attempt = 0
        while True:
            try:
                mbs = micro_batches(mine, lengths, self.batches.size, self.batches.tokens)
                own = len(mbs)
                if self.plan.fsdp:  # every forward and backward gathers weights from all ranks: all
                    # run as many micro-batches as the busiest rank, extra ones with zero loss weight
                    busiest = max(len(micro_batches(p, lengths, self.batches.size, self.batches.tokens))
                                  for p in every)
                    mbs += [step[:1]] * (busiest - own)
                return self.micro.run(mbs, own, counts, self.step_heads, self.global_step, attempt)
            except torch.OutOfMemoryError as exc:
                attempt += 1
                self._recover_from_oom(exc, attempt)
                restore_rng(rng)
            except StepAbandoned:
                self.update.zero_grad()
                restore_rng(rng)
                raise

    def shares(self, step: list[int]) -> list[list[int]]:
        """Every rank's samples of the step (`shares`): the step cut into micro-batches of the
        configured size (the same on every rank, whatever an out-of-memory retry did to one
        rank's), dealt out by what each costs the token-wise layers."""
        return shares(step, self.world.size, self.train_data.lengths, self.batches.configured,
                      self.batches.configured_tokens, self.micro.cost)

    def idle_heads(self) -> set[str]:
        """The heads without targets in the step under way (`Update.apply_update`)."""
        return {h for h, c in self.step_counts.items() if c == 0}

    def optimizer_step(self, parts: dict[str, torch.Tensor]) -> bool | None:
        """The update of the step `accumulate` ran (`Update.step`)."""
        return self.update.step(parts, self.global_step, self.idle_heads())

    def apply_update(self, optimizer: torch.optim.Optimizer, parts: dict[str, torch.Tensor]) -> bool:
        """`optimizer` (the LR sweep's own) updated from the step `accumulate` ran."""
        return self.update.apply_update(optimizer, parts, self.idle_heads())

    def settle(self) -> bool | None:
        return self.update.settle()

    def _recover_from_oom(self, exc: Exception, attempt: int) -> None:
        self.settle()  # the swap manager may rebuild the optimizer and schedule: the last step first
        if self.micro.graphs is not None:
            self.micro.graphs.reset()
        self.update.zero_grad()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        before = self.batches.size
        event = {"step": self.global_step, "epoch": self.epoch + 1, "attempt": attempt,
                 "micro_batch_before": before, "error": str(exc).splitlines()[0][:200],
                 "memory": memory.sample(self.device)}
        action, why = oom_action(before, attempt, self.cfg.memory, self.swap, self.device.type == "cuda",
                                 self.plan.fsdp, self.world.active and self.update.defers_checks())
        if action == "retry":
            self.batches.halve()
            event["action"] = f"retry with micro-batch {self.batches.size} (accumulation x{before // self.batches.size})"
        elif action == "swap":
            self.enable_swap()
            event["action"] = "Dynamic Swap Manager on (optimizer state to CPU memory), activation checkpointing on"
        else:
            event["action"] = "stop"
        event["micro_batch_after"] = self.batches.size
        self.oom_events.append(event)
        if action == "retry":
            log.warning("out of memory at step %d: %s", self.global_step, event["action"])
            return
        if action == "swap":
            log.warning("out of memory at step %d with micro-batch %d: %s", self.global_step, before, event["action"])
            return
        # Under several processes the others are waiting in the gradient all-reduce: no collective
        # save is possible; torchrun stops them when this rank exits, the last state stays.
        path = self.save_resume_state() if not self.world.active else None
        raise TrainingStopped(
            f"out of memory at step {self.global_step} with micro-batch {before}: {why}. "
            f"Resume with a smaller model (--preset), --set model.activation_checkpointing=true, or "
            f"{'more GPUs' if self.plan.fsdp else '--set memory.swap=on'}: --resume {path or 'latest'}", path, code=4)

    def enable_swap(self) -> None:
        """Move the optimizer (and EMA) to CPU memory mid-run, keeping their exact state; memory
        first elsewhere too: activation checkpointing on, no CUDA graphs, no bf16 copies."""
        self.update.to_swap()
        set_checkpointing(self.model, True)
        self.micro.release()
        torch.cuda.empty_cache()

    # ------------------------------------------------------------------ epochs

    def fit(self, progress=None) -> list[dict[str, Any]]:
        if self.world.main:
            write_plan(self.plan, self.paths)
        try:
            return self._fit(progress)
        except BaseException:
            self.ckpt.wait_for_save(collective=False)  # a background write completes before the error goes on
            raise
        finally:
            self.micro.abandonable = False

    def _fit(self, progress=None) -> list[dict[str, Any]]:
        cfg = self.cfg
        self.micro.abandonable = not self.world.active
        while self.epoch < cfg.train.epochs:
            epoch = self.epoch + 1
            steps = epoch_plan(self.train_data.lengths, cfg.effective_batch, cfg.train.seed, epoch,
                               cfg.data.length_group_steps)
            if self.step_in_epoch == 0:
                self.update.stats = StepStats()
                self._epoch_t0 = time.time()
            bar = progress(epoch, len(steps), self.step_in_epoch) if progress else None
            for i in range(self.step_in_epoch, len(steps)):
                parts, applied = self._step(steps[i], epoch, len(steps))  # forward, backward, update, EMA
                self.global_step += 1
                self.step_in_epoch = i + 1
                self._count(steps[i])
                if bar is not None:
                    if applied is None and bar.logs_next():  # the line reads the loss anyway: settle
                        applied = self.settle()
                    bar.step(self, parts, applied is not False)
                self._stop_if_asked(epoch, len(steps))
                if self.ckpt.due(self.global_step, len(steps) - self.step_in_epoch):  # train.resume_every_minutes
                    log.info("resume state at step %d (epoch %d, step %d/%d): %.4g minutes since the last",
                             self.global_step, epoch, self.step_in_epoch, len(steps),
                             (time.monotonic() - self.ckpt.last_begun) / 60)
                    self.save_resume_state(background=True)
            if bar is not None:
                bar.close()
            self.epoch = epoch
            self.step_in_epoch = 0
            self.finished = self.epoch == cfg.train.epochs
            self.end_of_epoch(len(steps))  # evaluate -> record -> save -> prune
            # a signal while closing the epoch; or its resume state not written (the run's last too)
            if any_rank(self.stop.requested, self.world) and (
                    not self.finished or any_rank(self.stop.write_failure is not None, self.world)):
                self.ckpt.wait_for_save()
                self.stop.signal_name = self.stop.signal_name or "a stop request on another rank"
                raise TrainingStopped(f"stopped by {self.stop.signal_name} at the end of epoch {epoch}",
                                      self.ckpt.last_resume_path, code=75)
        if not self.finished:  # a resumed run that had already finished: record that once
            self.finished = True
            self.save_resume_state()
        self.ckpt.wait_for_save()
        return self.history

    def _step(self, step: list[int], epoch: int, steps: int) -> tuple[dict[str, torch.Tensor], bool | None]:
        """One optimizer step (profiled at `train.profile_step`); a stop request met midway
        saves the state of the last completed step and stops."""
        self.model.train()
        try:
            if self.global_step + 1 == self.cfg.train.profile_step:
                return self._profiled_step(step)
            return self._train_step(step)
        except StepAbandoned:
            path = self.save_resume_state()
            raise TrainingStopped(f"stopped by {self.stop.signal_name} after step {self.global_step} (epoch "
                                  f"{epoch}, step {self.step_in_epoch}/{steps}); step {self.global_step + 1}, "
                                  f"left midway, is redone on resume", path, code=75) from None

    def _train_step(self, step: list[int]) -> tuple[dict[str, torch.Tensor], bool | None]:
        parts = self.accumulate(step)
        self.faults.corrupt(self.global_step, parts, self.model)
        return parts, self.optimizer_step(parts)

    def _profiled_step(self, step: list[int]) -> tuple[dict[str, torch.Tensor], bool | None]:
        """`train.profile_step`: this step under torch.profiler (`profile.profile_step`)."""
        from redheart.train.profile import profile_step

        with self.micro.annotating():
            return profile_step(lambda: self._train_step(step), self.device, self.paths.logs, self.global_step + 1,
                                self.world.rank)

    def _count(self, step: list[int]) -> None:
        """The step's samples, tokens and model FLOPs in the epoch's counts; its memory sampled."""
        cfg, stats = self.cfg, self.epoch_stats
        stats.samples += len(step)
        step_lengths = self.train_data.lengths[step]
        stats.tokens += int(step_lengths.sum())
        stats.flops += train_flops(cfg.model, step_lengths.tolist(), cfg.tech.rdrop_alpha > 0,
                                   not self.features["train"].cached, self.step_heads)
        if cfg.memory.monitor:
            self.memory_samples.append({"step": self.global_step, **memory.sample(self.device)})

    def _stop_if_asked(self, epoch: int, steps: int) -> None:
        """After a step: stop, with its state saved, after too many bad steps in a row or on a
        stop request (under several ranks, one any rank made, agreed by all at the step's sums)."""
        cfg, update = self.cfg, self.update
        if update.unchecked is not None and update.bad_steps_in_row >= cfg.train.max_bad_steps - 1:
            self.settle()  # one more bad step stops the run: decide at this step, as when synchronous
        if update.bad_steps_in_row >= cfg.train.max_bad_steps:
            path = self.save_resume_state()
            raise TrainingStopped(f"{update.bad_steps_in_row} optimizer steps in a row had a non-finite "
                                  f"loss or gradient; the last good state is kept", path, code=5)
        if self.faults.after_step(self.global_step, self.world.rank, self.stop):
            update.stop_agreed = True
        if self.world.active and update.stop_agreed and not self.stop.requested:
            self.stop.requested, self.stop.signal_name = True, "a stop request on another rank"
        if update.stop_agreed if self.world.active else self.stop.requested:
            path = self.save_resume_state()
            raise TrainingStopped(f"stopped by {self.stop.signal_name} after step {self.global_step} "
                                  f"(epoch {epoch}, step {self.step_in_epoch}/{steps})", path, code=75)

    def end_of_epoch(self, steps: int) -> dict[str, Any]:
        """Evaluate, record (metrics file, log, TensorBoard), save (snapshot, resume state) and
        prune (`steps`: the epoch's optimizer steps, for going back before its end)."""
        self.settle()
        cfg = self.cfg
        record = self._evaluate()
        self.history.append(record)
        failed_before = len(ckio.write_failures())
        if self.world.main:  # every rank holds the same record; one writes it
            try:
                self.write_metrics()
            except ckio.CheckpointError as exc:
                log.error("metrics record of epoch %d not written: %s", self.epoch, exc)
        log_epoch(record, cfg.train.epochs)
        failed = lambda: len(ckio.write_failures()) > failed_before  # noqa: E731 - this epoch's files
        if self.tb is not None and not failed():
            self.tb.epoch(record)
        if self.epoch % cfg.train.save_every == 0 or self.epoch == cfg.train.epochs:
            weights = (snapshot_weights(self.model, self.ema, cfg, self.world)
                       if self.world.main or self.plan.fsdp else None)  # FSDP: all gather
            if self.world.main and not failed():  # the snapshot, then the retention rule
                self.ckpt.save_snapshot(record, weights, self.update.lr, self.param_counts, self.history)
        if any_rank(failed(), self.world):
            self._unclose_epoch(record, steps)
        self.save_resume_state(background=True)
        return record

    def _evaluate(self) -> dict[str, Any]:
        """The epoch's metrics record: training means and speed, validation of the raw and the
        EMA weights."""
        cfg = self.cfg
        seconds = time.time() - self._epoch_t0
        tflops = self.epoch_stats.flops / max(seconds, 1e-9) / 1e12  # model FLOPs done per second
        train = self.epoch_stats.means()
        val, collapsed = validation(self.model, self.features["val"], cfg, self.dtype, self.world)
        val_ema = None
        if self.ema is not None:
            with self.ema.applied(self.model):
                val_ema = evaluate(self.model, self.features["val"], cfg, self.dtype, self.world)
        return {
            "epoch": self.epoch, "global_step": self.global_step, "lr": self.scheduler.get_last_lr()[0],
            "lr_steps": list(self.epoch_stats.lrs),
            "micro_batch": self.batches.size, "train": train, "val": val, "val_ema": val_ema,
            "collapsed": collapsed,  # head -> why its validation predictions collapsed (none: {})
            "samples": self.epoch_stats.samples,  # this epoch's, across interruptions (skipped steps' too)
            "seconds": seconds, "samples_per_s": self.epoch_stats.samples / max(seconds, 1e-9),
            "tokens_per_s": self.epoch_stats.tokens / max(seconds, 1e-9),
            "tflops": tflops, "mfu": tflops / (self.peak_tflops * self.world.size) if self.peak_tflops else None,
            "bad_steps": self.update.bad_steps_total, "memory": memory.sample(self.device),
            "timestamp": iso_now(),
        }

    def _unclose_epoch(self, record: dict[str, Any], steps: int) -> None:
        """The epoch's own files (metrics record, TensorBoard, snapshot) could not all be
        written: back to the state after its last step, saved if it can be, so that a resume
        redoes the epoch's end (validation, metrics, snapshot: the same numbers), then stop."""
        self.history.remove(record)
        self.epoch, self.step_in_epoch, self.finished = self.epoch - 1, steps, False
        path = self.save_resume_state()
        raise TrainingStopped(f"stopped at the end of epoch {self.epoch + 1} (global step {self.global_step}): its "
                              f"files could not all be written; the state after its last step is kept, and a resume "
                              f"redoes the epoch's end", path, code=75)

    def write_metrics(self) -> None:
        text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in self.history)
        ckio.atomic_write_text(text, self.paths.metrics_file)

    # ------------------------------------------------------------------ weights and states

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load whole weights (every rank holds them; under FSDP each keeps its shards); the EMA
        starts anew from them, and the swap manager's CPU master weights follow them."""
        like = self.model.state_dict()
        self.model.load_state_dict({k: shard_like(v, like.get(k, v)) for k, v in weights.items()})
        self.initial_weights = False
        if isinstance(self.optimizer, SwapAdamW):
            self.optimizer.sync_from_model()
        if self.ema is not None:
            self.ema.reset(self.model)

    def set_lr(self, lr: float) -> None:
        """Use a new peak LR (the sweep's choice) before training starts."""
        self.update.set_lr(lr)

    def resume_state(self, rngs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything to continue exactly, as plain tensors in the layout of one process (the
        optimizer's as `torch.optim` writes it): it resumes under any mode and number of
        processes. Under FSDP every rank must call it; rank 0's alone is whole."""
        self.settle()
        rngs = rngs or [capture_rng()]
        # Before the first optimizer step the weights are the seed's (and the EMA theirs, AdamW's
        # moments not yet made): the state keeps their fingerprint instead of them, so that a stop
        # then (the first 730m step on a CPU takes many minutes) saves in moments, not in minutes
        # of writing gigabytes; `restore` rebuilds them.
        initial = (self.global_step == 0 and self.initial_weights and not self.swap and not self.plan.fsdp
                   and not self.optimizer.state)
        ema = None
        if self.ema is not None:
            ema = ({"shadow": {}, "num_updates": 0, "decay": self.ema.decay, "warmup": self.ema.warmup} if initial
                   else gathered(self.ema.state_dict(), self.world))
        extra = {"weights": "initial", "initial_weights": {"seed": self.cfg.train.seed, "device": self.device.type,
                                                           "fingerprint": weights_fingerprint(self.model)}} if initial else {}
        update = self.update
        return {
            "kind": "resume", "format": ckio.FORMAT_VERSION, "run_id": self.paths.run_id,
            "config": self.cfg.to_dict(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "micro_batch": self.batches.size, "lr": update.lr,
            "model_state": {} if initial else model_state(self.model, self.world), **extra,
            "optimizer": gathered(self.optimizer.state_dict(), self.world), "scheduler": self.scheduler.state_dict(),
            "ema": ema,
            "rng": rngs[0], "rng_ranks": rngs, "history": self.history, "epoch_stats": self.epoch_stats.state(),
            "bad_steps_total": update.bad_steps_total, "bad_steps_in_row": update.bad_steps_in_row,
            "oom_events": self.oom_events, "sweep": self.sweep_result, "finished": self.finished,
            "epoch_elapsed_s": time.time() - self._epoch_t0,  # training time of the epoch so far
            "param_counts": self.param_counts,
        }

    def save_resume_state(self, background: bool = False) -> str | None:
        """A resume state, registered (`Checkpoints.save_resume_state`; None if not written or still
        being written). `background` where train.async_save allows, never under the swap manager
        (the thread's copy needs host memory, which is short there); a stop writes at once."""
        background = background and self.plan.async_save and not self.swap
        return self.ckpt.save_resume_state(self.resume_state, self.plan.fsdp, background)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly from a resume state (every rank holds it whole)."""
        initial = state.get("weights") == "initial"
        if initial:  # a state of global step 0: the seed's weights, as this trainer built them (`resume_state`)
            rebuilt = rebuild_initial_weights(self.cfg, state["initial_weights"], self.model)
            if rebuilt is not None:
                self.load_weights(rebuilt)
            self.initial_weights = True
        else:
            self.load_weights(state["model_state"])
        oom_events = list(state["oom_events"])
        if not self.swap and not self.plan.fsdp and \
                any(str(e.get("action", "")).startswith("Dynamic Swap Manager") for e in oom_events):
            self.enable_swap()  # an OOM had turned it on: go on as the interrupted run did
        self.optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], self.optimizer))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ckio.CheckpointError("the resume state has no EMA but the config has tech.ema_decay > 0")
            if not initial:  # (the EMA of the initial weights is those weights: load_weights reset it)
                self.ema.load_state_dict(state["ema"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.batches.restore(state, sum(1 for e in oom_events if str(e.get("action", "")).startswith("retry")))
        self.update.lr = float(state["lr"])
        self.history = list(state["history"])
        self.update.stats = StepStats.from_state(state["epoch_stats"], self.device)
        self.update.bad_steps_total = int(state["bad_steps_total"])
        self.update.bad_steps_in_row = int(state["bad_steps_in_row"])
        self.oom_events = oom_events
        self.sweep_result = state.get("sweep")
        self.finished = bool(state["finished"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) == self.world.size:  # the same number of processes: each its own streams
            restore_rng(ranks[self.world.rank])
        else:  # another number of processes: data order is by step, dropout streams start anew
            restore_rng(ranks[0])
            torch.manual_seed(self.cfg.train.seed + 1 + self.world.rank + self.global_step)
            log.warning("resumed with %d process(es), saved with %d: the dropout streams start anew "
                        "(data order and position are kept)", self.world.size, len(ranks))
        # the epoch's samples/s counts the samples and the training time before the stop too
        self._epoch_t0 = time.time() - (float(state.get("epoch_elapsed_s", 0.0)) if self.step_in_epoch else 0.0)
