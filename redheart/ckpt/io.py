"""Checkpoint files: atomic writes with a checksum, safe loading, and `metadata.json`.

A write goes to a temporary name in the same folder, is fsynced, renamed over the target and
the folder fsynced, so a reader sees the old file or the new one, never half of one. The
SHA-256 is computed while writing. Loading uses `weights_only=True` only: a file carrying
pickled code is refused. A process killed mid-write leaves only its `.NAME.tmp-PID` file, never
a partial file under the real name; `clean_stale_temp` removes those leftovers.

`set_faults` lets the test suite inject write failures (a full disk) and slow writes (to kill a
process while a temporary file is half written); it is empty outside tests.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
SAVE_MARGIN_BYTES = 64 * 1024 * 1024  # kept free beyond the file itself
TEMP_RE = re.compile(r"^\..+\.tmp-(\d+)$")  # `.NAME.tmp-PID`, as atomic writes name their temporary files

log = logging.getLogger("redheart")
_faults: dict[str, Any] = {}


def set_faults(faults: dict[str, Any]) -> None:
    """Test hooks: {"write_error": {"match": "NAME-PART", "after_bytes": N, "skip": K}} makes the
    writes of files whose name contains NAME-PART, after the first K of them, fail with ENOSPC
    once N bytes are written; {"slow_write_s": S} pauses S seconds inside each checkpoint write,
    its temporary file half written; {"write_wait_for": {"match": "NAME-PART", "path": P}} pauses
    the writes of files whose name contains NAME-PART (checkpoints and text files), half written,
    until the file P exists (at most 120 s)."""
    _faults.clear()
    _faults.update({k: v for k, v in faults.items() if k in ("write_error", "slow_write_s", "write_wait_for")})
    if _faults:
        _faults["matched"] = 0


def _byte_limit(path: Path) -> int | None:
    """How many bytes a write of `path` may put down before its injected failure (None: all)."""
    spec = _faults.get("write_error")
    if not spec or spec.get("match", "") not in path.name:
        return None
    _faults["matched"] += 1
    return int(spec.get("after_bytes", 0)) if _faults["matched"] > int(spec.get("skip", 0)) else None


def _wait_for(path: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


def _no_space(path: Path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device (injected by a test)", str(path))


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, read, verified or trusted."""


# ---------------------------------------------------------------------------------------
# The one rule for a write that fails (a full disk, a quota, a folder that went read-only):
# every writer of a run (checkpoints, metrics and other JSON, the log file, TensorBoard, plots)
# reports it here, with the path and the space it needs; a run listens (`on_write_failure`)
# and stops at once, keeping what it still can, with the resumable exit code.

SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def human_bytes(n: float) -> str:
    """1023 B, 812.0 KiB, 73.4 MiB, 1.25 GiB: enough digits to tell two sizes apart."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def free_bytes(folder: Path) -> int | None:
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


class WriteFailed(CheckpointError):
    """A file could not be written: `path`, the error, and for a lack of space how much the
    write needed (`need`, bytes, None if unknown) against what is free in its folder."""

    def __init__(self, path: Path, cause: OSError | str, need: int | None = None, free: int | None = None):
        self.path, self.cause, self.need = Path(path), cause, need
        self.free = free if free is not None else free_bytes(self.path.parent)
        self.no_space = isinstance(cause, str) or getattr(cause, "errno", None) in SPACE_ERRNOS
        text = f"could not write {self.path}: {cause}"
        if isinstance(cause, OSError) and self.no_space:
            needs = f"it needs about {human_bytes(need)}" if need else "it needs more space"
            text += f" ({needs}; {human_bytes(self.free) if self.free is not None else 'nothing'} free in {self.path.parent})"
        super().__init__(text)


_failures: list[WriteFailed] = []
_listeners: list[Callable[[WriteFailed], None]] = []


def report_write_failure(exc: WriteFailed) -> WriteFailed:
    """Record a failed write and tell the listeners (the run's stop); returns it for `raise`."""
    _failures.append(exc)
    for fn in list(_listeners):
        fn(exc)
    return exc


def write_failures() -> list[WriteFailed]:
    return list(_failures)


def on_write_failure(fn: Callable[[WriteFailed], None] | None) -> None:
    """Listen for failed writes (None: stop listening and forget those recorded)."""
    _listeners.clear()
    _failures.clear()
    if fn is not None:
        _listeners.append(fn)


def injected_failure(path: Path) -> OSError | None:
    """A test's ENOSPC (`write_error`) for a writer that does not go through the atomic writes
    (the log file, TensorBoard): an error when its name matches, after the first K matches."""
    if not _faults or not _faults.get("write_error"):
        return None
    limit = _byte_limit(Path(path))
    return _no_space(Path(path)) if limit is not None else None


class _HashingWriter(io.RawIOBase):
    def __init__(self, f, path: Path):
        self.f, self.path, self.sha, self.size = f, path, hashlib.sha256(), 0
        self.limit = _byte_limit(path) if _faults else None
        self.paused = False
        self.error: OSError | None = None  # torch.save reports a failed write only as a position mismatch

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        try:
            if _faults:
                if self.limit is not None and self.size + len(b) > self.limit:
                    raise _no_space(self.path)
                if _faults.get("slow_write_s") and not self.paused and self.size > 0:
                    self.paused = True
                    self.f.flush()
                    time.sleep(float(_faults["slow_write_s"]))
                wait = _faults.get("write_wait_for")
                if wait and not self.paused and self.size > 0 and wait["match"] in self.path.name:
                    self.paused = True
                    self.f.flush()
                    _wait_for(wait["path"])
            n = self.f.write(b)
        except OSError as exc:
            self.error = exc
            raise
        self.sha.update(b)
        self.size += len(b)
        return n


def tensor_bytes(obj: Any) -> int:
    """Bytes of all tensors inside nested dicts/lists (an estimate of the file size)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_free_space(folder: Path, need: int, path: Path | None = None) -> None:
    """WriteFailed (reported) unless `folder` has `need` bytes free beyond SAVE_MARGIN_BYTES."""
    free = shutil.disk_usage(folder).free
    if free < need + SAVE_MARGIN_BYTES:
        what = f" for {path.name}" if path is not None else ""
        raise report_write_failure(WriteFailed(
            path or folder, f"not enough disk space in {folder}{what}: {human_bytes(free)} free, "
            f"{human_bytes(need + SAVE_MARGIN_BYTES)} needed ({human_bytes(need)} for the file and "
            f"{human_bytes(SAVE_MARGIN_BYTES)} kept free)", need + SAVE_MARGIN_BYTES, free))


def _without_zip_crc():
    """torch.save computes a CRC-32 of every record that torch.load never checks; our SHA-256 of
    the whole file is the check. Skipping it makes a 730m resume state (10.9 GB) write faster."""
    try:
        from torch.utils.serialization import config
        return config.patch({"save.compute_crc32": False})
    except (ImportError, AttributeError, KeyError):  # an older PyTorch: computed as before
        return contextlib.nullcontext()


def atomic_save(obj: Any, path: Path, before_rename: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Write `obj` with torch.save atomically; returns {"sha256", "size"}. `before_rename` is
    called with them once the file is complete under its temporary name (a failure there is
    one of the write).

    On any failure (full disk, write error) the temporary file is removed and the previous
    file at `path`, if any, is left untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise report_write_failure(WriteFailed(path, exc)) from None
    need = tensor_bytes(obj)
    check_free_space(path.parent, need, path)
    tmp = temp_name(path)
    w = None
    try:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f, path)
            with _without_zip_crc():
                torch.save(obj, w)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename({"sha256": w.sha.hexdigest(), "size": w.size})
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, CheckpointError):
            raise
        if isinstance(exc, (OSError, RuntimeError)):
            cause = w.error if w is not None and w.error is not None else exc
            raise report_write_failure(WriteFailed(path, cause, need)) from exc
        raise
    return {"sha256": w.sha.hexdigest(), "size": w.size}


def atomic_write_text(text: str, path: Path) -> None:
    """Write a text file atomically; a failure (full disk) raises WriteFailed (reported) and
    leaves the previous file as it was."""
    atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_bytes(data: bytes, path: Path) -> None:
    """`atomic_write_text` for bytes (a PNG, ...)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise report_write_failure(WriteFailed(path, exc, len(data))) from None
    tmp = temp_name(path)
    try:
        limit = _byte_limit(path) if _faults else None
        with open(tmp, "wb") as f:
            if limit is not None and len(data) > limit:
                f.write(data[:limit])
                raise _no_space(path)
            if _faults.get("write_wait_for") and _faults["write_wait_for"]["match"] in path.name:
                f.write(data[:len(data) // 2])
                f.flush()
                _wait_for(_faults["write_wait_for"]["path"])
                data = data[len(data) // 2:]
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise report_write_failure(WriteFailed(path, exc, len(data))) from exc
        raise


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clean_stale_temp(folder: Path) -> list[Path]:
    """Remove the temporary files of writes whose process is gone (killed mid-write); files of
    a live process are left alone. Returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = TEMP_RE.match(p.name)
        if m and p.is_file() and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            try:
                p.unlink()
                removed.append(p)
            except OSError as exc:
                log.warning("could not remove the leftover temporary file %s: %s", p, exc)
    return removed


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load(path: str | Path, expected_sha256: str | None = None, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint safely (`weights_only=True`), optionally verifying its checksum. With
    `mmap` the tensors stay in the file, read in only when used (a resume state's AdamW moments,
    twice the model, need not enter memory to read its weights)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}")
    _check_kind_of_file(path)
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise CheckpointError(
                f"checkpoint {path} is corrupted: SHA-256 {actual[:12]}... does not match the "
                f"recorded {expected_sha256[:12]}..."
            )
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickle protocols: the error below says it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path}: it holds pickled Python objects{_what_pickled(str(exc))}, not "
            f"only tensors and plain values, and loading it could run code. Only checkpoints written "
            f"by this system load."
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, IndexError,
            TypeError, AttributeError, UnicodeDecodeError, MemoryError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {first}") from None
    if not isinstance(obj, dict) or "model_state" not in obj:
        raise CheckpointError(f"{path} is not a Red Heart checkpoint (no model_state)")
    return obj


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format (a zip archive)
PICKLE_PROTO = 0x80  # the first byte of a pickle of protocol 2 or later: torch.save's legacy format


def _check_kind_of_file(path: Path) -> None:
    """Refuse, naming what it is, a file that no version of torch.save wrote: a text file, a
    safetensors file, anything else. Only a zip archive or a pickle reaches torch.load (whose
    weights-only refusal of a pickle says `could run code`, wrong for a text file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
    if head.startswith(ZIP_MAGIC) or head[:1] == bytes([PICKLE_PROTO]):
        return
    if not head:
        raise CheckpointError(f"{path} is empty: not a checkpoint")
    if len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        raise CheckpointError(f"{path} is a safetensors file (weights only, no config), not a checkpoint of this "
                              f"system: give the .pth (or .pt) file of the same name")
    try:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as exc:  # a character cut by the 64 bytes read
            if len(head) < 64 or exc.start < len(head) - 3:
                raise
            text = head[:exc.start].decode("utf-8")
        what = f"a text file beginning {text.strip()[:40]!r}" if text.strip() else "a text file of blanks"
    except UnicodeDecodeError:
        what = f"a file of unknown kind (its first bytes: {head[:12].hex(' ')})"
    raise CheckpointError(f"{path} is not a checkpoint: {what}, where a checkpoint is a file written by this "
                          f"system (a zip archive of tensors: .pt/.pth)")


def _what_pickled(message: str) -> str:
    """The offending global of torch's weights-only refusal (e.g. ` (posix.system)`), if named."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    if m:
        return f" ({m.group(1)})"
    m = re.search(r"Unsupported operand (\d+)", message)
    return f" (pickle instruction {m.group(1)} is not allowed)" if m else ""


# ---------------------------------------------------------------------------------------
# metadata.json: one entry per saved epoch snapshot


def read_metadata(folder: Path) -> list[dict[str, Any]]:
    """The entries of `folder/metadata.json` ([] when there is none); CheckpointError when it is
    not a list of entries. Paths are taken relative to the folder, so a moved or copied output
    directory still finds its files."""
    path = Path(folder) / "metadata.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the next snapshot a run saves rebuilds it from "
                              f"the snapshot files (or move it aside)") from None
    if not isinstance(data, list) or not all(isinstance(e, dict) and isinstance(e.get("path"), str) for e in data):
        raise CheckpointError(f"{path}: expected a list of checkpoint entries, each with a path")
    return rebase(data, Path(folder))


def rebase(entries: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    """Entries with each path pointing into `folder` (checkpoints always live beside their list)."""
    return [{**e, "path": str(folder / Path(e["path"]).name)} for e in entries]


def write_metadata(folder: Path, entries: list[dict[str, Any]]) -> None:
    atomic_write_text(json.dumps(entries, indent=2, allow_nan=True) + "\n", Path(folder) / "metadata.json")


def rebuild_metadata(folder: Path) -> list[dict[str, Any]]:
    """Recover from an unreadable metadata.json: move it aside (`metadata.json.corrupt-<time>`)
    and list again every epoch snapshot in the folder that loads, with its checksum."""
    folder = Path(folder)
    bad = folder / "metadata.json"
    if bad.exists():
        aside = folder / f"metadata.json.corrupt-{time.strftime('%Y%m%d_%H%M%S')}"
        os.replace(bad, aside)
        log.warning("%s was unreadable: moved aside to %s; rebuilding it from the snapshot files", bad, aside.name)
    entries = []
    for p in sorted(folder.glob("checkpoint_epoch_*.pt")):
        try:
            ck = load(p)
        except CheckpointError as exc:
            log.error("not listed in the rebuilt metadata.json: %s", exc)
            continue
        if ck.get("kind") != "snapshot":
            continue
        entries.append({"epoch": int(ck["epoch"]), "lr": ck.get("lr"), "path": str(p), "file": p.name,
                        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(p.stat().st_mtime)),
                        "sha256": sha256_file(p), "size_bytes": p.stat().st_size, "run_id": ck.get("run_id"),
                        "global_step": ck.get("global_step"), "weights": ck.get("weights"),
                        "metrics": ck.get("metrics", {}), "rebuilt": True})
    entries.sort(key=lambda e: (e["timestamp"], e["epoch"]))
    write_metadata(folder, entries)
    return entries
