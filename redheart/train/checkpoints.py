"""A run's checkpoints: epoch snapshots (listed in metadata.json, pruned by the retention rule
with Sweet Spot's pins) and resume states (registered in resume_states.json, the newest
`train.resume_states_kept` kept), written atomically, a resume state optionally from a thread
while training goes on. What a resume state holds is the trainer's (`Trainer.resume_state`);
how it is written, listed and pruned is here."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map_only

from redheart.ckpt import io as ckio
from redheart.ckpt.retention import select_deletions
from redheart.ckpt.state import RunPaths, capture_rng, iso_now, read_registry, sidecar_path, write_registry
from redheart.ckpt.sweetspot import pinned_epochs
from redheart.config import Config
from redheart.dist import World, all_objects, any_rank, broadcast, gathered
from redheart.model.network import RedHeartNet
from redheart.train.ema import EMA

log = logging.getLogger("redheart")


def detached_copy(tree: Any) -> Any:
    """`tree` (a state: dicts, lists, tensors) with every tensor copied to the CPU and every
    container new, so that nothing training changes afterwards reaches it."""
    return tree_map_only(torch.Tensor, lambda t: t.detach().to("cpu", copy=True), tree)


def model_state(model: torch.nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The whole model's weights, plain tensors on the CPU. Under FSDP every rank must call
    it (the shards are gathered) and only rank 0 gets them."""
    return {k: v.detach().cpu() for k, v in gathered(model.state_dict(), world).items() if v is not None}


def snapshot_weights(model: torch.nn.Module, ema: EMA | None, cfg: Config, world: World) -> dict[str, torch.Tensor]:
    """What an epoch snapshot keeps (raw or EMA weights, whole); under FSDP see `model_state`."""
    dtype = torch.bfloat16 if cfg.train.snapshot_dtype == "bf16" else torch.float32
    if cfg.train.snapshot_weights == "ema" and ema is not None:
        src = gathered(ema.weights(), world)
    else:
        src = model_state(model, world)
    return {k: v.detach().to("cpu", dtype) for k, v in src.items() if v is not None}


class Checkpoints:
    """The snapshot and resume-state files of one run (`paths`); under several processes every
    rank holds one, rank 0 writes."""

    def __init__(self, paths: RunPaths, cfg: Config, world: World):
        self.paths, self.cfg, self.world = paths, cfg, world
        self.pins: set[str] = set()  # the snapshots Sweet Spot pins (never pruned)
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="redheart-save")  # a thread once used
        self._pending: Future | None = None
        self._save_pending = False
        self.last_resume_path: str | None = None
        self.last_begun = time.monotonic()  # when the last resume state was begun (or the trainer made)

    def save_snapshot(self, record: dict[str, Any], weights: dict[str, torch.Tensor], peak_lr: float,
                      param_counts: dict[str, int], history: list[dict[str, Any]]) -> str | None:
        """The epoch snapshot of `record` (the epoch's metrics record) with `weights`, listed in
        metadata.json; then the retention rule (`prune`). None when it could not be written."""
        lr, epoch, global_step = record["lr"], record["epoch"], record["global_step"]
        # the name carries the run's peak LR (the sweep's choice or train.lr), as in the guide's
        # `checkpoint_epoch_0002_lr_0.000100_...`; the scheduled LR at the epoch's end is in `lr`
        path = self.paths.snapshot_path(epoch, peak_lr)
        metrics = {"loss": record["val"]["loss"], "train_loss": record["train"].get("loss"),
                   "train": record["train"],  # every component of the training loss (task, rdrop, heads)
                   **{k: v for k, v in record["val"].items() if k != "loss"}}
        if record["val_ema"]:
            metrics["ema"] = record["val_ema"]
        ckpt = {"kind": "snapshot", "format": ckio.FORMAT_VERSION, "run_id": self.paths.run_id,
                "epoch": epoch, "global_step": global_step, "lr": lr,
                "weights": self.cfg.train.snapshot_weights, "model_state": weights,
                "metrics": metrics, "config": self.cfg.to_dict(), "param_counts": param_counts}
        try:
            info = ckio.atomic_save(ckpt, path)
        except ckio.CheckpointError as exc:
            log.error("epoch %d snapshot not saved: %s", epoch, exc)
            return None
        try:
            try:
                entries = ckio.read_metadata(self.paths.checkpoints)
            except ckio.CheckpointError as exc:
                log.error("%s", exc)
                entries = ckio.rebuild_metadata(self.paths.checkpoints)
            # an epoch redone after a crash has the same file name: its old entry goes
            entries = [e for e in entries if e["path"] != str(path)]
            entries.append({"epoch": epoch, "lr": lr, "path": str(path), "file": path.name,
                            "timestamp": iso_now(), "sha256": info["sha256"], "size_bytes": info["size"],
                            "run_id": self.paths.run_id, "global_step": global_step,
                            "weights": self.cfg.train.snapshot_weights, "metrics": metrics})
            self.prune(entries, history)
        except ckio.CheckpointError as exc:
            log.error("metadata.json not updated (%s is on disk but not listed): %s", path.name, exc)
            return None
        log.info("saved %s (%.1f MiB)", path.name, info["size"] / 2**20)
        return str(path)

    def prune(self, entries: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
        """Apply the retention limit to the epoch snapshots, never touching those Sweet Spot pins
        (from the metrics records of `history`)."""
        own = [e for e in entries if e.get("run_id") == self.paths.run_id]
        keep_epochs = pinned_epochs(history, self.cfg)
        self.pins = {e["path"] for e in own if e["epoch"] in keep_epochs}
        doomed = set(select_deletions(entries, self.cfg.train.keep_checkpoints, self.pins))
        if len(self.pins) > self.cfg.train.keep_checkpoints:
            log.warning("%d snapshots are pinned by Sweet Spot, more than keep_checkpoints=%d: all kept",
                        len(self.pins), self.cfg.train.keep_checkpoints)
        ckio.write_metadata(self.paths.checkpoints, [e for e in entries if e["path"] not in doomed])
        for p in doomed:  # after the list is written, so that it never names a deleted file
            try:
                Path(p).unlink(missing_ok=True)
                log.info("retention: deleted %s", p)
            except OSError as exc:
                log.warning("retention: could not delete %s: %s", p, exc)

    def save_resume_state(self, state_of: Callable[[list[dict[str, Any]]], dict[str, Any]], everywhere: bool,
                          background: bool = False) -> str | None:
        """Write a resume state and register it; the registry keeps the newest
        `train.resume_states_kept`. On failure the previous states stay as they were and None
        comes back (also in `last_resume_path`). Under several processes every rank calls it:
        rank 0 writes, with every rank's RNG streams, and all get its answer.

        With `background`, rank 0 writes a copy of the state from a thread while training goes
        on; `wait_for_save` joins it (every later save, the end of `fit` and any stop wait first),
        so states are written one at a time and in order.

        `state_of(rngs)`: the state, given every rank's RNG streams; called on rank 0, and on every
        rank where `everywhere` (FSDP: the shards are gathered)."""
        self.wait_for_save()
        self.last_begun = time.monotonic()
        rngs = all_objects(capture_rng(), self.world)
        state = state_of(rngs) if self.world.main or everywhere else None
        if background:
            if self.world.main:  # training goes on changing the originals: the thread gets copies
                self._pending = self._saver.submit(self._write_in_background, detached_copy(state))
            self._save_pending = True
            return None
        path = self._write_resume_state(state) if self.world.main else None
        self.last_resume_path = broadcast(path, self.world)
        return self.last_resume_path

    def due(self, global_step: int, steps_left: int) -> bool:
        """Whether a resume state is due mid-epoch (`train.resume_every_minutes`): that long since
        the last was begun, the last written, and not at the epoch's last step (its end saves one).
        Several ranks: rank 0's clock decides, agreed at the log steps (where they sync anyway)."""
        minutes = self.cfg.train.resume_every_minutes
        if minutes <= 0 or steps_left == 0:
            return False
        due = (self.world.main and time.monotonic() - self.last_begun >= minutes * 60
               and not (self._pending is not None and not self._pending.done()))
        if not self.world.active:
            return due
        return bool(global_step % self.cfg.train.log_every == 0 and any_rank(due, self.world))

    def wait_for_save(self, collective: bool = True) -> None:
        """Join a background write, if any; its path becomes `last_resume_path` (on every rank
        when `collective`; False on the way out of an error, where ranks may be anywhere)."""
        if not self._save_pending:
            return
        path = self._pending.result() if self._pending is not None else None
        self._pending, self._save_pending = None, False
        self.last_resume_path = broadcast(path, self.world) if collective else path

    def _write_in_background(self, state: dict[str, Any]) -> str | None:
        t0 = time.time()
        try:
            path = self._write_resume_state(state)
        except ckio.CheckpointError as exc:  # reported (a failed write stops the run), the previous state kept
            log.error("resume state not saved (the previous one is kept): %s", exc)
            return None
        except Exception:  # noqa: BLE001 - reported, and the previous state stays registered
            log.exception("resume state not saved (the previous one is kept)")
            return None
        if path:
            log.info("resume state written in the background: %s (%.1f s)", Path(path).name, time.time() - t0)
        return path

    def _write_resume_state(self, state: dict[str, Any]) -> str | None:
        """Write and register `state`; reads nothing of the trainer that training changes (a
        background write runs while it does)."""
        path = self.paths.resume_path(state["global_step"])
        entry = {"path": str(path), "run_id": self.paths.run_id,
                 **{k: state[k] for k in ("epoch", "step_in_epoch", "global_step", "finished")}}

        def side_file(info: dict[str, Any]) -> None:  # the entry beside the file until it is registered
            entry.update({"sha256": info["sha256"], "size_bytes": info["size"], "timestamp": iso_now()})
            ckio.atomic_write_text(json.dumps({**entry, "path": path.name}) + "\n", sidecar_path(path))

        try:
            ckio.atomic_save(state, path, before_rename=side_file)
        except ckio.CheckpointError as exc:
            sidecar_path(path).unlink(missing_ok=True)
            log.error("resume state not saved (the previous one is kept): %s", exc)
            return None
        entries = [e for e in read_registry(self.paths.root) if e["path"] != str(path) and Path(e["path"]).is_file()]
        entries.append(entry)
        keep = self.cfg.train.resume_states_kept
        old, entries = entries[:-keep], entries[-keep:]
        try:
            write_registry(self.paths.root, entries)
        except ckio.CheckpointError as exc:  # unregistered: the next run would adopt it, but this one goes on
            log.error("resume state not saved (the previous one is kept): %s", exc)
            path.unlink(missing_ok=True)
            sidecar_path(path).unlink(missing_ok=True)
            return None
        sidecar_path(path).unlink(missing_ok=True)
        listed = {e["path"] for e in entries}
        # the states dropped from the list, and this run's states a kill left unregistered
        orphans = [str(p) for p in self.paths.checkpoints.glob(f"resume_state_{self.paths.run_id}_step*.pt")]
        for p in {e["path"] for e in old} | set(orphans):
            if p not in listed:
                Path(p).unlink(missing_ok=True)
                sidecar_path(p).unlink(missing_ok=True)
        return str(path)
