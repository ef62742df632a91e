"""Checkpoint files: atomic writes with a checksum, safe loading, and `metadata.json`.

A write goes to a temporary name in the same folder, is fsynced, renamed over the target and
the folder fsynced, so a reader sees the old file or the new one, never half of one. The
SHA-256 is computed while writing. Loading uses `weights_only=True` only: a file carrying
pickled code is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
SAVE_MARGIN_BYTES = 64 * 1024 * 1024  # kept free beyond the file itself


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, read, verified or trusted."""


class _HashingWriter(io.RawIOBase):
    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)


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


def check_free_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need + SAVE_MARGIN_BYTES:
        raise CheckpointError(
            f"not enough disk space in {folder}: {free / 2**30:.2f} GiB free, "
            f"{(need + SAVE_MARGIN_BYTES) / 2**30:.2f} GiB needed"
        )


def atomic_save(obj: Any, path: Path) -> dict[str, Any]:
    """Write `obj` with torch.save atomically; returns {"sha256", "size"}.

    On any failure (full disk, write error) the temporary file is removed and the previous
    file at `path`, if any, is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path.parent, tensor_bytes(obj))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            torch.save(obj, w)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):
            raise CheckpointError(f"could not write {path}: {exc}") from exc
        raise
    return {"sha256": w.sha.hexdigest(), "size": w.size}


def atomic_write_text(text: str, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load(path: str | Path, expected_sha256: str | None = None) -> dict[str, Any]:
    """Load a checkpoint safely (`weights_only=True`), optionally verifying its checksum."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint: {path}")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise CheckpointError(
                f"checkpoint {path} is corrupted: SHA-256 {actual[:12]}... does not match the "
                f"recorded {expected_sha256[:12]}..."
            )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path}: it holds pickled Python objects, not only tensors and plain "
            f"values, and loading it could run code. Only checkpoints written by this system load. "
            f"({str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is unreadable or truncated: {exc}") from None
    if not isinstance(obj, dict) or "model_state" not in obj:
        raise CheckpointError(f"{path} is not a Red Heart checkpoint (no model_state)")
    return obj


# ---------------------------------------------------------------------------------------
# metadata.json: one entry per saved epoch snapshot


def read_metadata(folder: Path) -> list[dict[str, Any]]:
    path = Path(folder) / "metadata.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); move it aside to start a new one") from None
    if not isinstance(data, list):
        raise CheckpointError(f"{path}: expected a list of checkpoint entries")
    return data


def write_metadata(folder: Path, entries: list[dict[str, Any]]) -> None:
    atomic_write_text(json.dumps(entries, indent=2, allow_nan=True) + "\n", Path(folder) / "metadata.json")
