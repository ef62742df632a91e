"""A stop request to a CPU run of the 730m preset is honoured within a minute, with a state that
resumes (slow: about 10 GB of memory and a few minutes on two cores; `-m slow`).

Without a GPU a micro-batch of 730m takes about a minute on two cores and its first optimizer
step many minutes: the stop is met inside the micro-batch (at a Transformer layer), the step is
left, and the state of global step 0 is saved without its weights (the seed's, rebuilt on
resume), so writing it takes moments instead of the minutes of 6 GB.
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import ROOT
from redheart.ckpt import io as ckio
from redheart.ckpt.state import read_registry

ARGS = ["unified-train", "--preset", "730m", "--device", "cpu", "--max-records", "40", "--no-lr-sweep",
        "--epochs", "1", "--set", "train.log_every=1"]


class Run:
    def __init__(self, *extra: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("REDHEART_FAULTS", None)
        self.p = subprocess.Popen([sys.executable, "-m", "redheart", *ARGS, *extra], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line)
            self.q.put(line)
        self.q.put(None)

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (line := self.q.get(timeout=max(0.01, deadline - time.monotonic()))) is not None:
            if re.search(pattern, line):
                return
        raise AssertionError(f"ended before {pattern!r}:\n{''.join(self.lines)}")

    def stop(self) -> tuple[int, float]:
        t0 = time.monotonic()
        self.p.send_signal(signal.SIGTERM)
        try:
            rc = self.p.wait(timeout=180)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise
        return rc, time.monotonic() - t0


@pytest.mark.slow
def test_sigterm_stops_a_cpu_run_of_730m_within_60_s_with_a_state_that_resumes(tmp_path):
    out = tmp_path / "out"
    first = Run("--output-dir", str(out))
    try:
        first.wait_for(r"Red Heart AI training run", timeout=600)  # the start summary: training begins
        time.sleep(20)  # inside the first micro-batch's forward or backward
        rc, seconds = first.stop()
    finally:
        first.p.kill()
    text = "".join(first.lines)
    assert rc == 75, text
    assert seconds < 60, (seconds, text)
    first_seconds = seconds
    assert "preset 730m" in text and "Traceback" not in text
    assert re.search(r"stopped by SIGTERM after step 0 \(epoch 1, step 0/\d+\); step 1, left midway, is redone on resume",
                     text), text
    (entry,) = read_registry(out)
    state = ckio.load(entry["path"], entry["sha256"])
    assert state["global_step"] == 0 and state["weights"] == "initial" and entry["size_bytes"] < 10 * 2**20

    second = Run("--output-dir", str(out), "--resume", "latest")
    try:
        second.wait_for(r"resumed run \S+ at epoch 1, step 0 \(global step 0\)", timeout=600)
        rc, seconds = second.stop()
    finally:
        second.p.kill()
    text = "".join(second.lines)
    assert rc == 75 and seconds < 60, (rc, seconds, text)
    print(f"\n730m on this CPU: stopped {first_seconds:.0f} s after SIGTERM in its first step, {seconds:.0f} s after "
          f"the resume")
