"""What goes into the two kinds of checkpoint, and where they live in an output directory.

- Epoch snapshots `checkpoints_final/checkpoint_epoch_EEEE_lr_<peak lr>_<ts>.pt`: the weights (in
  `train.snapshot_dtype`), the epoch's metrics and the config. Small; Sweet Spot and
  Crossover read them; listed in `metadata.json`.
- Resume states `checkpoints_final/resume_state_<run>_step<N>.pt`: everything an exact
  continuation needs (fp32 weights, optimizer, schedule, EMA, RNG states, data position,
  metric history, OOM state). The newest `train.resume_states_kept` are kept, listed with
  their checksums in `resume_states.json`.

Both load with `torch.load(path, weights_only=True)` and hold `model_state`.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from redheart.ckpt.io import CheckpointError, FORMAT_VERSION, atomic_write_text, load, read_metadata, rebase

log = logging.getLogger("redheart")


def timestamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S")


def iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S") + f".{int(time.time() * 1e6) % 1_000_000:06d}"


@dataclass
class RunPaths:
    root: Path
    run_id: str

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints_final"

    @property
    def sweep(self) -> Path:
        return self.root / "lr_sweep_results"

    @property
    def sweetspot(self) -> Path:
        return self.root / "sweet_spot_analysis"

    @property
    def oom(self) -> Path:
        return self.root / "oom_stats"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def metrics_file(self) -> Path:
        return self.logs / f"metrics_{self.run_id}.jsonl"

    @property
    def log_file(self) -> Path:
        return self.logs / f"training_{self.run_id}.log"

    @property
    def config_file(self) -> Path:
        return self.logs / f"config_{self.run_id}.yaml"

    @property
    def tensorboard(self) -> Path:
        return self.logs / f"tb_{self.run_id}"

    @property
    def memory_file(self) -> Path:
        return self.logs / f"memory_{self.run_id}.json"

    @property
    def plan_file(self) -> Path:
        """How the run trains on this machine (`redheart.train.plan.RunPlan`), as its last launch settled it."""
        return self.logs / f"plan_{self.run_id}.json"

    def snapshot_path(self, epoch: int, lr: float) -> Path:
        # <ts> is the run's start time, so the same epoch of the same run always has the same name:
        # an epoch redone after a crash replaces its snapshot instead of leaving a second one.
        return self.checkpoints / f"checkpoint_epoch_{epoch:04d}_lr_{lr:.6f}_{self.run_id}.pt"

    def resume_path(self, global_step: int) -> Path:
        return self.checkpoints / f"resume_state_{self.run_id}_step{global_step:08d}.pt"

    def make(self) -> None:
        for p in (self.checkpoints, self.logs):
            p.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------
# RNG states (as tensors and plain values, so they load with weights_only=True)


def capture_rng() -> dict[str, Any]:
    import numpy as np

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            for i in range(torch.cuda.device_count()):
                torch.cuda.set_rng_state(cuda_states[i % len(cuda_states)], i)


# ---------------------------------------------------------------------------------------
# Resume-state registry


def registry_path(root: Path) -> Path:
    return Path(root) / "checkpoints_final" / "resume_states.json"


def read_registry(root: Path) -> list[dict[str, Any]]:
    """The registered resume states, oldest first. An unreadable registry is replaced by a scan of
    the folder (the files are complete, being renamed into place, but their checksums are lost);
    the next save writes a sound registry again."""
    path = registry_path(root)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        data = None
    if not isinstance(data, list) or not all(isinstance(e, dict) and isinstance(e.get("path"), str) for e in data):
        log.warning("%s is unreadable; resume states are found by scanning the folder (without checksums)", path)
        return _scan_resume_states(root)
    return rebase(data, path.parent)


_RESUME_RE = re.compile(r"^resume_state_(.+)_step(\d+)\.pt$")


def _scan_resume_states(root: Path) -> list[dict[str, Any]]:
    found = []
    for p in (Path(root) / "checkpoints_final").glob("resume_state_*.pt"):
        m = _RESUME_RE.match(p.name)
        if m:
            found.append((p.stat().st_mtime, int(m.group(2)), p, m.group(1)))
    found.sort(key=lambda f: (f[0], f[1]))
    return [{"path": str(p), "sha256": None, "timestamp": "", "run_id": run_id, "global_step": step,
             "finished": False} for _, step, p, run_id in found]


def write_registry(root: Path, entries: list[dict[str, Any]]) -> None:
    atomic_write_text(json.dumps(entries, indent=2) + "\n", registry_path(root))


# ---------------------------------------------------------------------------------------
# Resume states on disk that the registry does not list
#
# A resume state is written as: the file under a temporary name (fsynced), then its registry
# entry beside it as `NAME.json` (with its checksum), then the rename to NAME, then the
# registry, then the side file goes. A kill between the rename and the registry leaves a
# complete state that the registry does not list: an orphan, found by scanning the folder and
# verified by the checksum of its side file (or, written without one, by loading it).


def sidecar_path(path: str | Path) -> Path:
    """`resume_state_..._stepN.pt.json`: a state's registry entry, while it is not yet registered."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def orphan_entries(root: Path, registered: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Entries for the resume states in the folder that `registered` (the registry) does not
    list, oldest first: from each one's side file (its checksum), or, without one, with the
    checksum None (`load` then checks only that it reads). Not verified here."""
    folder = Path(root) / "checkpoints_final"
    listed = {Path(e["path"]).name for e in (read_registry(root) if registered is None else registered)}
    found = []
    for p in folder.glob("resume_state_*.pt"):
        m = _RESUME_RE.match(p.name)
        if not m or p.name in listed:
            continue
        entry: dict[str, Any] = {"run_id": m.group(1), "global_step": int(m.group(2)), "sha256": None,
                                 "finished": False, "timestamp": ""}
        try:
            side = json.loads(sidecar_path(p).read_text(encoding="utf-8"))
            if isinstance(side, dict) and isinstance(side.get("sha256"), str):
                entry.update({k: v for k, v in side.items() if k != "path"})
        except (OSError, ValueError):
            pass
        try:
            mtime = p.stat().st_mtime
        except OSError:
            continue
        found.append((mtime, entry["global_step"], {**entry, "path": str(p), "orphan": True}))
    found.sort(key=lambda f: (f[0], f[1]))
    return [e for _, _, e in found]


def _mtime(entry: dict[str, Any]) -> float:
    try:
        return Path(entry["path"]).stat().st_mtime
    except OSError:
        return float("-inf")


def with_orphans(entries: list[dict[str, Any]], orphans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The registry's entries and the orphans in one list, oldest first: an orphan newer than
    every registered file (the case of a kill before the registry write) comes last."""
    newest = max((_mtime(e) for e in entries), default=float("-inf"))
    older = [o for o in orphans if _mtime(o) <= newest]
    return older + entries + [o for o in orphans if o not in older]


def adopt_orphans(root: Path) -> list[dict[str, Any]]:
    """Register every complete resume state the registry does not list (its checksum matching
    its side file, or, without one, it loads as a resume state); set aside those that are not
    sound (`NAME.corrupt`); remove side files left without their state or after registration.
    For the process that holds the output directory's lock. Returns the entries adopted."""
    folder = Path(root) / "checkpoints_final"
    if not folder.is_dir():
        return []
    registered = read_registry(root)
    orphans = orphan_entries(root, registered)
    for side in folder.glob("resume_state_*.pt.json"):  # a state registered, or never renamed into place
        if not side.with_name(side.name[:-len(".json")]).is_file() or \
                side.name[:-len(".json")] in {Path(e["path"]).name for e in registered}:
            side.unlink(missing_ok=True)
    if not orphans:
        return []
    adopted, bad = [], []
    for entry in orphans:
        try:
            ckpt = load(entry["path"], entry.get("sha256"), mmap=True)
            if ckpt.get("kind") != "resume":
                raise CheckpointError(f"{entry['path']} is not a resume state")
        except CheckpointError as exc:
            log.error("an unregistered resume state is not sound: %s", exc)
            bad.append(entry)
            continue
        if entry.get("sha256") is None:  # written without a side file: its checksum from now on
            from redheart.ckpt.io import sha256_file

            entry.update({"sha256": sha256_file(entry["path"]), **{
                k: ckpt.get(k) for k in ("run_id", "epoch", "step_in_epoch", "global_step", "finished")}})
        entry.pop("orphan", None)
        entry.setdefault("size_bytes", Path(entry["path"]).stat().st_size)
        adopted.append(entry)
        log.warning("found %s (run %s, global step %s) on disk but not in %s, as a run killed while registering "
                    "it leaves it: it is complete and now registered", Path(entry["path"]).name, entry.get("run_id"),
                    entry.get("global_step"), registry_path(root).name)
    if adopted:
        write_registry(root, with_orphans(registered, adopted))
        for e in adopted:
            sidecar_path(e["path"]).unlink(missing_ok=True)
    if bad:
        set_aside(root, bad)
        for e in bad:
            sidecar_path(e["path"]).unlink(missing_ok=True)
    return adopted


def find_resume_state(root: Path, skipped: list[dict[str, Any]] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The newest resume state whose checksum matches, the registry's or one on disk that it
    does not list (`orphan_entries`); corrupted or missing ones are reported by name and
    skipped for the previous one (and appended to `skipped`).

    Returns (checkpoint, registry entry). Raises CheckpointError when none is usable.
    """
    registered = read_registry(root)
    entries = with_orphans(registered, orphan_entries(root, registered))
    if not entries:
        raise CheckpointError(f"no resume state in {Path(root) / 'checkpoints_final'}: nothing to resume "
                              f"(start the run without --resume)")
    problems = []
    for entry in reversed(entries):
        try:
            ckpt = load(entry["path"], entry.get("sha256"))
            if ckpt.get("kind") != "resume":
                raise CheckpointError(f"{entry['path']} is not a resume state")
        except CheckpointError as exc:
            log.error("skipping %s: %s", Path(entry["path"]).name, exc)
            problems.append(str(exc))
            if skipped is not None:
                skipped.append(entry)
            continue
        if problems:
            log.warning("resuming from the previous good state %s", Path(entry["path"]).name)
        return ckpt, entry
    raise CheckpointError("no usable resume state (start anew with --restart): " + "; ".join(problems))


def set_aside(root: Path, bad: list[dict[str, Any]]) -> None:
    """Take resume states found corrupted out of the registry, so they hold no place among the
    ones kept; a corrupted file is renamed `NAME.corrupt` (kept for inspection, never loaded)."""
    if not bad:
        return
    gone = {e["path"] for e in bad}
    for path in gone:
        p = Path(path)
        if p.is_file():
            try:
                os.replace(p, p.with_name(p.name + ".corrupt"))
                log.warning("renamed the corrupted %s to %s.corrupt (delete it when no longer needed)", p.name, p.name)
            except OSError as exc:
                log.warning("could not rename %s: %s", p, exc)
    try:
        write_registry(root, [e for e in read_registry(root) if e["path"] not in gone])
    except CheckpointError as exc:
        log.warning("the registry of resume states could not be updated: %s", exc)


def check_snapshot(ckpt: dict[str, Any], path: Path) -> None:
    if ckpt.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {ckpt.get('format')!r} is not {FORMAT_VERSION}")


def snapshot_entries(root: Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """metadata.json entries (optionally of one run) whose files still exist."""
    entries = read_metadata(Path(root) / "checkpoints_final")
    return [e for e in entries if (run_id is None or e.get("run_id") == run_id) and Path(e["path"]).is_file()]


def newest_run(root: Path, run_id: str | None) -> str:
    """`run_id`, or the run of the newest snapshot in `root`, or of its newest metrics record."""
    if run_id:
        return run_id
    entries = snapshot_entries(root)
    if entries:
        return max(entries, key=lambda e: e["timestamp"])["run_id"]
    metrics = sorted((root / "logs").glob("metrics_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not metrics:
        raise CheckpointError(f"{root} holds no run (no metadata.json entries, no logs/metrics_*.jsonl)")
    return metrics[-1].stem.removeprefix("metrics_")


def read_history(paths: RunPaths) -> list[dict[str, Any]]:
    """The run's metrics record: one dict per epoch."""
    if not paths.metrics_file.is_file():
        raise CheckpointError(f"no metrics record {paths.metrics_file}")
    history = [json.loads(line) for line in paths.metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not history:
        raise CheckpointError(f"{paths.metrics_file} holds no epoch yet: nothing to plot")
    return history
