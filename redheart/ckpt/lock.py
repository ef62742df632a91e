"""One run at a time in an output directory.

Two runs writing into one output directory overwrite each other's files: the same
`crossover_final.pth`, run ids of the same second, one run's retention deleting the other's
resume states. A run therefore holds an advisory lock (`fcntl.flock`) on
`<output_dir>/.redheart.lock` from before it reads the directory until it ends; under torchrun
only rank 0, which writes the files, takes it. The kernel drops the lock when the process
ends, however it ends (SIGKILL, the out-of-memory killer), so a killed run never leaves a lock
that blocks the next one; no pid file has to be judged alive or stale. The file holds the
holder's pid, command and start time, for the message that refuses a second run.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".redheart.lock"


class OutputDirBusy(RuntimeError):
    """Another live process holds the output directory's lock."""

    def __init__(self, root: Path, holder: dict[str, Any]):
        self.root, self.holder = root, holder
        who = f"pid {holder['pid']}" if holder.get("pid") else "another process"
        if holder.get("host") and holder.get("host") != socket.gethostname():
            who += f" on {holder['host']}"
        what = f" ({holder['command']}, started {holder['started']})" if holder.get("command") else ""
        stop = f"stop it (kill -TERM {holder['pid']}: it saves a resume state first), " if holder.get("pid") else ""
        super().__init__(
            f"{root} is in use by another run: {who}{what}. Two runs in one output directory would "
            f"overwrite each other's checkpoints. Wait for it to end, {stop}or give this run another --output-dir")


class OutputLock:
    def __init__(self, path: Path, fd: int, created_root: bool):
        self.path, self._fd, self._created_root = path, fd, created_root

    @classmethod
    def acquire(cls, root: str | Path) -> "OutputLock":
        """Take the lock of `root` (made if missing), or raise OutputDirBusy at once."""
        root = Path(root)
        created = not root.exists()
        if created:  # (a file under the name: the open below says so, naming the path)
            root.mkdir(parents=True, exist_ok=True)
        path = root / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputDirBusy(root, holder) from None
            except OSError:  # a file system without flock: no lock, as before
                os.close(fd)
                return cls(path, -1, created)
            # the holder before us may have removed the file between our open and our lock: a lock
            # on a removed file guards nothing, so take the one of the file now under the name
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(["redheart", *sys.argv[1:]])[:300] if sys.argv else ""}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return cls(path, fd, created)

    def release(self) -> None:
        """Drop the lock and remove its file (and the output directory, if this run made it and
        left nothing else in it: a refused start leaves no folder behind)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: no one can hold a lock on it now
        except OSError:
            pass
        os.close(fd)
        if self._created_root:
            try:
                self.path.parent.rmdir()
            except OSError:
                pass


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
