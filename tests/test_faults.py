"""Fault injection: stop, crash, corruption, a full disk and non-finite losses lose nothing.

Real processes (`python -m redheart ...`, the tiny preset on a 60-record slice: 2 epochs x 6
optimizer steps) are stopped by real signals at points a seeded RNG chooses: the log line of
step k, then a random delay (REDHEART_FAULT_SEED=N draws other points). Corrupted files are real
files with flipped bytes or cut short; a full disk is an injected ENOSPC inside the write, or a
free-space check that finds too little. Each scenario ends with the uninterrupted run's final
weights bit for bit (model, EMA, optimizer, schedule, metrics history), or with the exact error
expected.

The scenarios' processes all start with the module, each driven by a thread of this process
(a process trains on one thread, so together they keep the cores busy); each test then takes
its scenario's outcome. The resumes after a kill (one goes through the CLI end to end, in the
SIGTERM scenario) and the scenarios that need no signal run in this process, on one thread like
the subprocesses, so their weights compare bit for bit with the subprocess reference.

The figures (scenarios, kills survived, corruptions caught, records lost) are printed when the
module ends.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from helpers import ROOT, newest_state, read_log, run, same_tensors, tiny_config
from redheart.ckpt import io as ckio
from redheart.ckpt.state import find_resume_state, read_registry

SEED = int(os.environ.get("REDHEART_FAULT_SEED", "8"))
STEPS_PER_EPOCH, EPOCHS = 6, 2
TRAIN_RECORDS = 46  # the training split of the 60-record slice
COMMON = ["--preset", "tiny", "--max-records", "60", "--no-lr-sweep", "--device", "cpu",
          "--set", "train.grad_accum=4", "--set", "train.log_every=1", "--set", "crossover.enabled=false"]
TRAIN = ["unified-train", "--epochs", str(EPOCHS), *COMMON]
# The same run in this process (the log interval and the crossover do not change the weights).
IN_PROCESS = dict(data__max_records=60, train__epochs=EPOCHS, train__grad_accum=4, train__device="cpu")
TIMING_KEYS = {"seconds", "samples_per_s", "tokens_per_s", "tflops", "mfu", "memory", "timestamp"}

FIGURES: Counter = Counter()
STARTED: list[subprocess.Popen] = []  # every process this module started, ended at its teardown


def rng_for(name: str) -> random.Random:
    return random.Random(f"{SEED}-{name}")


# ---------------------------------------------------------------------------------------
# Processes


def child_env(faults: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("SAMPLES", None)
    env.pop("REDHEART_FAULTS", None)
    if faults:
        env["REDHEART_FAULTS"] = json.dumps(faults)
    return env


class Proc:
    """A `python -m redheart` process (or a command wrapping one) whose output is read live."""

    def __init__(self, args: list[str], faults: dict | None = None, command: list[str] | None = None):
        cmd = command or [sys.executable, "-m", "redheart", *args]
        self.p = subprocess.Popen(cmd, cwd=ROOT, env=child_env(faults), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        STARTED.append(self.p)
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line)
            self._q.put(line)
        self._q.put(None)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n{self.text}") from None
            if line is None:
                raise AssertionError(f"the process ended before a line matching {pattern!r}:\n{self.text}")
            m = re.search(pattern, line)
            if m:
                return m

    def wait_step(self, k: int) -> None:
        self.wait_for(rf"\(global {k}\)")

    def send(self, sig: int) -> None:
        self.p.send_signal(sig)

    def finish(self, timeout: float = 300) -> int:
        rc = self.p.wait(timeout)
        self._reader.join(timeout)
        return rc


def cli_run(args: list[str], faults: dict | None = None) -> tuple[int, str]:
    p = Proc(args, faults)
    return p.finish(), p.text


def train_args(out: Path, *extra: str) -> list[str]:
    return [*TRAIN, "--output-dir", str(out), *extra]


def resume_or_start(out: Path) -> list[str]:
    """What a user does after a crash: --resume latest, or a fresh start when nothing was saved."""
    return train_args(out, "--resume", "latest") if read_registry(out) else train_args(out)


def resume_here(out: Path) -> int:
    """`--resume latest` in this process: the function the CLI calls, without a new process's
    start-up (the end-to-end CLI resume is in the SIGTERM scenario)."""
    return run(tiny_config(out, **IN_PROCESS), resume="latest", analysis=False)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ckio.TEMP_RE.match(p.name)]


def wait_for_temp(folder: Path, proc: Proc, timeout: float = 300) -> Path:
    """A checkpoint's temporary file with its first bytes written (the slowed write pauses there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in temp_files(folder) if ".pt.tmp-" in p.name and p.exists() and p.stat().st_size > 0]
        if found:
            return found[0]
        assert proc.p.poll() is None, f"the process ended without a checkpoint write in progress:\n{proc.text}"
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint write in progress within {timeout}s")


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_bytes(path: Path, rng: random.Random, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for _ in range(n):
        i = rng.randrange(len(data) // 4, len(data) * 3 // 4)  # inside the tensor data
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------------
# Comparison


def history_without_timing(h: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in h]


def assert_same_final_state(ref: dict, got: dict) -> None:
    """The resumed run ended exactly where the uninterrupted one did; counts records lost."""
    assert got["finished"] and got["global_step"] == ref["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert same_tensors(ref["model_state"], got["model_state"]) == []
    assert same_tensors(ref["ema"]["shadow"], got["ema"]["shadow"]) == []
    assert ref["ema"]["num_updates"] == got["ema"]["num_updates"]
    assert ref["optimizer"]["state"].keys() == got["optimizer"]["state"].keys()
    for k in ref["optimizer"]["state"]:
        assert same_tensors(ref["optimizer"]["state"][k], got["optimizer"]["state"][k]) == []
    assert ref["optimizer"]["param_groups"] == got["optimizer"]["param_groups"]
    assert ref["scheduler"] == got["scheduler"]
    assert torch.equal(ref["rng"]["torch"], got["rng"]["torch"])
    # every training record trained exactly once per epoch, as in the uninterrupted run
    lost = sum(abs(r.get("samples", 0) - g.get("samples", 0)) for r, g in zip(ref["history"], got["history"]))
    lost += TRAIN_RECORDS * EPOCHS - sum(g.get("samples", 0) for g in got["history"])
    FIGURES["records lost"] += lost
    assert lost == 0
    assert history_without_timing(ref["history"]) == history_without_timing(got["history"])
    FIGURES["final states equal bit for bit"] += 1


def assert_files_sound(out: Path) -> None:
    """No temporary file left; every listed checkpoint exists and matches its checksum; no
    resume state on disk that the registry does not list."""
    assert temp_files(out) == []
    ck = out / "checkpoints_final"
    for e in ckio.read_metadata(ck) + read_registry(out):
        assert Path(e["path"]).is_file(), e["path"]
        ckio.load(e["path"], e["sha256"])
    assert {p.name for p in ck.glob("resume_state_*.pt")} == {Path(e["path"]).name for e in read_registry(out)}
    epochs = [e["epoch"] for e in ckio.read_metadata(ck)]
    assert len(epochs) == len(set(epochs)), f"an epoch listed twice: {epochs}"


# ---------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module", autouse=True)
def figures(request):
    yield
    if FIGURES:
        capman = request.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():
            print(f"\nfault-injection figures (seed {SEED}): "
                  + ", ".join(f"{k} {v}" for k, v in sorted(FIGURES.items())))


@pytest.fixture
def one_thread():
    """In-process runs on one thread, as the subprocesses run (OMP_NUM_THREADS=1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Reference:
    """The uninterrupted run, started at once in the background: it runs while the first
    scenarios start theirs, and is waited for when a comparison needs it."""

    def __init__(self, out: Path):
        self.out = out
        self.proc = Proc(train_args(out))
        self._state = None

    def state(self) -> dict:
        if self._state is None:
            assert self.proc.finish() == 0, self.proc.text
            self._state = newest_state(self.out)
            assert self._state["finished"]
        return self._state

    def state_at(self, global_step: int) -> dict:
        self.state()
        entry = next(e for e in read_registry(self.out) if e["global_step"] == global_step)
        return ckio.load(entry["path"], entry["sha256"])


# ---------------------------------------------------------------------------------------
# The signal scenarios' processes. Each runs on one thread, so they are all started together
# when the module starts (in threads of this process) and a test takes its scenario's outcome;
# the in-process resumes and comparisons then run in the test itself.


def stop_with_sigterm(out: Path, rng: random.Random) -> dict:
    """A run stopped by SIGTERM in its second epoch. The signal goes twice at once, as GNU
    timeout sends it (to the child, then to its group): that is still one clean stop."""
    p = Proc(train_args(out))
    k = rng.randint(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH - 2)
    p.wait_step(k)
    time.sleep(rng.uniform(0, 0.2))
    p.send(signal.SIGTERM)
    p.send(signal.SIGTERM)
    return {"out": out, "rc": p.finish(), "text": p.text, "k": k}


def kill_three_times(out: Path, rng: random.Random) -> dict:
    """kill -9: at a random step; while a checkpoint's temporary file is half written (writes
    slowed to 3 s by a test hook); right after the final snapshot's 'saved' line (while the
    resume state is being written). Each next process continues from what is on disk."""
    ck = out / "checkpoints_final"
    p1 = Proc(train_args(out))
    p1.wait_step(rng.randint(1, 2 * STEPS_PER_EPOCH - 1))
    time.sleep(rng.uniform(0, 0.3))
    p1.send(signal.SIGKILL)
    rc1 = p1.finish()
    lock = out / ".redheart.lock"
    lock_left = json.loads(lock.read_text())["pid"] if lock.is_file() else None  # the kill left its file

    p2 = Proc(resume_or_start(out), faults={"slow_write_s": 3})
    tmp = wait_for_temp(ck, p2)
    time.sleep(rng.uniform(0, 0.5))
    p2.send(signal.SIGKILL)
    rc2 = p2.finish()
    tmp_size = tmp.stat().st_size if tmp.is_file() else None
    target = ck / re.sub(r"^\.(.+)\.tmp-\d+$", r"\1", tmp.name)
    listed = {e["path"]: e["sha256"] for e in ckio.read_metadata(ck) + read_registry(out)}
    target_sound = str(target) not in listed or bool(ckio.load(target, listed[str(target)]))

    p3 = Proc(resume_or_start(out))
    p3.wait_for(r"saved checkpoint_epoch_0002")
    p3.send(signal.SIGKILL)
    rc3 = p3.finish()
    return {"rcs": [rc1, rc2, rc3], "tmp": tmp, "tmp_size": tmp_size, "target_sound": target_sound, "p3": p3.text,
            "lock_left": lock_left, "p1_pid": p1.p.pid, "p2": p2.text}


def kill_after_a_timed_state(out: Path, rng: random.Random) -> dict:
    """kill -9 in epoch 2 (no time to save anything) once a mid-epoch resume state of step k or
    later is registered; train.resume_every_minutes so short that every step is due."""
    p = Proc(train_args(out, "--set", "train.resume_every_minutes=1e-05"))
    k = rng.randint(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH - 3)
    p.wait_for(rf"resume state at step {k} ")
    deadline = time.monotonic() + 120
    while not any(e["global_step"] >= k for e in read_registry(out)) and time.monotonic() < deadline:
        time.sleep(0.005)
    p.send(signal.SIGKILL)
    rc = p.finish()
    return {"out": out, "rc": rc, "text": p.text, "k": k,
            "saved": max(e["global_step"] for e in read_registry(out))}


def interrupt_twice(out: Path, rng: random.Random) -> dict:
    """Ctrl-C in epoch 2, then Ctrl-C again (after the 1 s in which a repeat counts as the same
    request) while the resumable state is being written, slowed to 5 s by a test hook."""
    p = Proc(train_args(out), faults={"slow_write_s": 5})
    k = rng.randint(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH - 2)
    p.wait_step(k)
    time.sleep(rng.uniform(0, 0.2))
    p.send(signal.SIGINT)
    p.wait_for(r"SIGINT received: stopping before the next micro-batch")
    handled = time.monotonic()  # the handler had run: the 1 s counts from here at the latest
    tmp = wait_for_temp(out / "checkpoints_final", p)
    time.sleep(max(0.0, handled + 1.2 - time.monotonic()))
    second = time.monotonic()
    p.send(signal.SIGINT)
    rc = p.finish()
    return {"rc": rc, "seconds": time.monotonic() - second, "text": p.text, "tmp": tmp, "tmp_left": tmp.is_file()}


def expire_timeout(out: Path, rng: random.Random) -> dict:
    """`timeout -s TERM 600 python -m redheart unified-test --samples 2 --debug --verbose ...`
    with the timer made to expire at a chosen step (SIGALRM to timeout is its expiry)."""
    args = ["unified-test", "--samples", str(EPOCHS), "--debug", "--verbose", *COMMON, "--output-dir", str(out)]
    p = Proc([], command=["timeout", "-s", "TERM", "600", sys.executable, "-m", "redheart", *args])
    p.wait_step(rng.randint(2, 2 * STEPS_PER_EPOCH - 2))
    time.sleep(rng.uniform(0, 0.2))
    p.send(signal.SIGALRM)
    return {"rc": p.finish(), "text": p.text}


def stop_during_setup(out: Path, rng: random.Random) -> dict:
    p = Proc(train_args(out))
    p.wait_for(r"encoder states: ")
    p.send(signal.SIGTERM)
    return {"rc": p.finish(), "text": p.text}


def corrupt_a_snapshot(d: Path, rng: random.Random, reference: "Reference") -> dict:
    """A flipped epoch snapshot in a copy of the reference run, met by `validate` and by
    `crossover` (the two at once)."""
    assert reference.proc.finish() == 0, reference.proc.text
    out = copy_run(reference.out, d / "run")
    snap = Path(ckio.read_metadata(out / "checkpoints_final")[-1]["path"])
    flip_bytes(snap, rng)
    validate = Proc(["validate", "--preset", "tiny", "--device", "cpu", "--output-dir", str(out)])
    crossover = Proc(["crossover", str(out), "--device", "cpu"])
    return {"snap": snap, "validate": (validate.finish(), validate.text), "crossover": (crossover.finish(), crossover.text)}


class Payload:
    """Any class of the user's: pickled, it needs code to come back."""


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def load_pickled_code(d: Path, rng: random.Random) -> dict:
    """A resume state carrying os.system, and a checkpoint holding a user class, given to
    `--resume` and `predict` (the two at once)."""
    evil, custom, marker = d / "evil.pt", d / "custom.pt", d / "code-ran"
    torch.save({"kind": "resume", "model_state": {"w": torch.zeros(2)}, "config": {}, "x": RunsCode(marker)}, evil)
    torch.save({"model_state": {"w": torch.zeros(2)}, "payload": Payload()}, custom)
    resume = Proc(train_args(d / "out", "--resume", str(evil)))
    predict = Proc(["predict", "--checkpoint", str(custom), "I lied to my friend."])
    return {"evil": evil, "custom": custom, "marker": marker,
            "resume": (resume.finish(), resume.text), "predict": (predict.finish(), predict.text)}


def nan_three_in_a_row(d: Path, rng: random.Random) -> dict:
    """NaN losses at steps 7, 8 and 9 (REDHEART_FAULTS) with train.max_bad_steps=3."""
    bad = [STEPS_PER_EPOCH, STEPS_PER_EPOCH + 1, STEPS_PER_EPOCH + 2]  # as the log counts steps: from 0
    p = Proc(train_args(d, "--set", "train.max_bad_steps=3"), faults={"nan_at_steps": bad})
    return {"out": d, "rc": p.finish(), "text": p.text}


def oom_then_stop(d: Path, rng: random.Random) -> dict:
    """An injected OOM at step 2, straight through and stopped at step 9 (the two at once)."""
    straight = Proc(train_args(d / "straight"), faults={"oom_at_step": 2})
    stopped = Proc(train_args(d / "stopped"), faults={"oom_at_step": 2, "stop_at_step": 9})
    return {"straight": (d / "straight", straight.finish(), straight.text),
            "stopped": (d / "stopped", stopped.finish(), stopped.text)}


def kill_while_registering(out: Path, rng: random.Random) -> dict:
    """kill -9 while the first resume state's registry is half written (its write held by a
    test hook until a file that never comes): the state itself is complete, renamed into place."""
    ck = out / "checkpoints_final"
    p = Proc(train_args(out), faults={"write_wait_for": {"match": "resume_states.json", "path": str(out / "never")}})
    deadline = time.monotonic() + 300
    while not (tmp := [t for t in temp_files(out) if t.name.startswith(".resume_states.json.tmp-")]):
        assert p.p.poll() is None and time.monotonic() < deadline, p.text
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.2))
    p.send(signal.SIGKILL)
    return {"out": out, "rc": p.finish(), "text": p.text, "tmp": tmp[0], "states": sorted(ck.glob("resume_state_*"))}


MOUNTS: list[Path] = []  # the tmpfs disks of the full-disk scenarios, unmounted at the module's end


def mount_tmpfs(where: Path, size: str) -> str | None:
    """A real small disk (tmpfs) at `where`; None, or why there can be none (not root, ...)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return "mounting a tmpfs needs root"
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if p.returncode:
        return f"mount -t tmpfs failed: {p.stderr.strip()}"
    MOUNTS.append(where)
    return None


def three_mib_disk(d: Path, rng: random.Random) -> dict:
    """unified-train on a 3 MiB disk, where no checkpoint fits."""
    why = mount_tmpfs(d / "disk", "3m")
    if why:
        return {"skip": why}
    t0 = time.monotonic()
    p = Proc(train_args(d / "disk" / "out"))
    return {"rc": p.finish(), "text": p.text, "seconds": time.monotonic() - t0, "out": d / "disk" / "out"}


def disk_fills_in_epoch_2(d: Path, rng: random.Random) -> dict:
    """A 100 MiB disk that another program fills (a ballast file written until ENOSPC) while the
    run is in epoch 2."""
    why = mount_tmpfs(d / "disk", "100m")
    if why:
        return {"skip": why}
    out, ballast = d / "disk" / "out", d / "disk" / "ballast"
    p = Proc(train_args(out))
    k = rng.randint(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH - 3)
    p.wait_step(k)
    with open(ballast, "wb", buffering=0) as f:
        for chunk in (2**20, 2**12, 1):  # to the last byte
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass
    full_at = max(int(n) for n in re.findall(r"\(global (\d+)\)", p.text))  # the last step logged once full
    return {"rc": p.finish(), "text": p.text, "full_at": full_at, "out": out, "ballast": ballast}


def two_runs_at_once(d: Path, rng: random.Random) -> dict:
    """Two runs started at the same moment into one output directory (different seeds)."""
    procs = [Proc(train_args(d, "--epochs", "1", "--seed", str(seed))) for seed in (1, 2)]
    return {"out": d, "results": [(p.finish(), p.text, p.p.pid) for p in procs]}


SCENARIOS = {"sigterm": stop_with_sigterm, "sigkill": kill_three_times, "sigint": interrupt_twice,
             "timed_state": kill_after_a_timed_state,
             "setup": stop_during_setup, "snapshot": corrupt_a_snapshot, "pickled": load_pickled_code,
             "nan": nan_three_in_a_row, "oom": oom_then_stop, "two_runs": two_runs_at_once,
             "registering": kill_while_registering, "small_disk": three_mib_disk, "disk_fills": disk_fills_in_epoch_2}
if shutil.which("timeout"):
    SCENARIOS["timeout"] = expire_timeout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference"))
    yield ref
    if ref.proc.p.poll() is None:
        ref.proc.p.kill()


@pytest.fixture(scope="module", autouse=True)
def scenario(tmp_path_factory, reference):
    """name -> the outcome of that scenario's processes (a future: .result()). Started with the
    module, so that they run while the in-process scenarios run in the main thread."""
    pool = ThreadPoolExecutor(max_workers=len(SCENARIOS))
    futures = {name: pool.submit(fn, tmp_path_factory.mktemp(name), rng_for(name),
                                 *([reference] if name == "snapshot" else [])) for name, fn in SCENARIOS.items()}
    yield futures
    for p in STARTED:  # those of scenarios a -k selection left unread
        if p.poll() is None:
            p.kill()
    pool.shutdown(wait=True)
    for where in MOUNTS:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="module")
def stopped(scenario):
    return scenario["sigterm"].result()


# ---------------------------------------------------------------------------------------
# In this process first, while the scenarios' processes run in the background


def test_leftover_temporary_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        gone = tmp_path / f".resume_state_x_step00000004.pt.tmp-{dead.stdout.strip()}"
        live = tmp_path / f".metadata.json.tmp-{sleeper.pid}"
        other = tmp_path / "notes.tmp-1"
        for p in (gone, live, other):
            p.write_bytes(b"partial")
        assert ckio.clean_stale_temp(tmp_path) == [gone]
        assert not gone.exists() and live.exists() and other.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_non_finite_steps_are_skipped_counted_and_logged(tmp_path, one_thread):
    FIGURES["scenarios"] += 1
    out = tmp_path / "run"
    faults = {"nan_at_steps": [3], "inf_grad_at_steps": [8]}
    assert run(tiny_config(out, **IN_PROCESS), analysis=False, faults=faults) == 0
    FIGURES["non-finite steps skipped"] += 2
    log = read_log(out)
    assert "step 3: non-finite loss or gradient, update skipped (1 in a row, 1 in all)" in log
    assert "step 8: non-finite loss or gradient, update skipped (1 in a row, 2 in all)" in log
    state = newest_state(out)
    assert [r["bad_steps"] for r in state["history"]] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["train"]["loss"])) for r in state["history"])
    assert state["ema"]["num_updates"] == state["scheduler"]["last_epoch"] == EPOCHS * STEPS_PER_EPOCH - 2
    assert all(torch.isfinite(v).all() for v in state["model_state"].values())


# ---------------------------------------------------------------------------------------
# A full disk


class Said:
    """The run's log records, console lines included (a full disk may have closed the log file)."""

    def __enter__(self) -> "Said":
        self.records: list[logging.LogRecord] = []
        self.handler = logging.Handler()
        self.handler.emit = self.records.append
        logging.getLogger("redheart").addHandler(self.handler)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("redheart").removeHandler(self.handler)

    @property
    def text(self) -> str:
        return "\n".join(r.getMessage() for r in self.records)


RESUME_HINT = r"free space there \(or move the output directory to a larger disk\), then resume with: bash run_learning.sh " \
              r"unified-train --resume "


def test_disk_full_inside_a_snapshot_write_stops_the_run_keeping_its_last_step(reference, tmp_path, one_thread):
    """ENOSPC 64 KiB into the epoch-2 snapshot: no file under its name, the epoch-1 snapshot and
    the list stay sound; the run stops at once (75) with the state after epoch 2's last step,
    saying which file needs how much space; the resume redoes the epoch's end (validation,
    metrics, snapshot) and ends with the straight run's weights."""
    FIGURES["scenarios"] += 1
    out = tmp_path / "run"
    cfg = tiny_config(out, **IN_PROCESS, train__save_every=1)
    faults = {"write_error": {"match": "checkpoint_epoch_0002", "after_bytes": 65536}}
    with Said() as said:
        assert run(cfg, analysis=False, faults=faults) == 75
    FIGURES["disk faults survived"] += 1
    assert re.search(r"epoch 2 snapshot not saved: could not write \S+checkpoint_epoch_0002\S+: \[Errno 28\] No space "
                     r"left on device .+ \(it needs about \d+\.\d MiB; [\d.]+ \w+ free in \S+checkpoints_final\)",
                     said.text), said.text
    assert f"stopped at the end of epoch 2 (global step {EPOCHS * STEPS_PER_EPOCH}): its files could not all be written; " \
           f"the state after its last step is kept, and a resume redoes the epoch's end" in said.text
    assert re.search(RESUME_HINT + rf"\S+_step{EPOCHS * STEPS_PER_EPOCH:08d}\.pt", said.text), said.text
    ck = out / "checkpoints_final"
    assert [e["epoch"] for e in ckio.read_metadata(ck)] == [1]
    assert not list(ck.glob("checkpoint_epoch_0002*"))
    kept = newest_state(out)
    assert (kept["epoch"], kept["step_in_epoch"], kept["finished"], len(kept["history"])) == (1, STEPS_PER_EPOCH, False, 1)
    assert_files_sound(out)
    assert resume_here(out) == 0
    assert [e["epoch"] for e in ckio.read_metadata(ck)] == [1, 2]
    assert_same_final_state(reference.state(), newest_state(out))
    assert_files_sound(out)


def test_disk_full_at_a_stop_keeps_the_previous_state_and_says_so(reference, tmp_path, one_thread, monkeypatch):
    """The free-space check finds too little for the resume state of a stop: the stop says no new
    state was written, which file needed how much space, and names the last complete one, from
    which the run resumes exactly."""
    FIGURES["scenarios"] += 1
    out = tmp_path / "run"
    cfg = tiny_config(out, **IN_PROCESS)
    real = shutil.disk_usage
    calls = Counter()

    def usage(path):
        calls["n"] += 1
        u = real(path)
        return u if calls["n"] <= 2 else u._replace(free=1024)  # full after the epoch-1 state

    monkeypatch.setattr(ckio.shutil, "disk_usage", usage)
    with Said() as said:
        assert run(cfg, analysis=False, faults={"stop_at_step": 9}) == 75
    monkeypatch.setattr(ckio.shutil, "disk_usage", real)
    FIGURES["disk faults survived"] += 1
    assert re.search(r"resume state not saved \(the previous one is kept\): could not write \S+_step00000009\.pt: not "
                     r"enough disk space in \S+checkpoints_final for resume_state_\S+_step00000009\.pt: 1\.0 KiB free, "
                     r"\d+\.\d MiB needed \(\d+\.\d MiB for the file and 64\.0 MiB kept free\)", said.text), said.text
    assert re.search(rf"no new resumable state was written; the last complete one is \S+_step{STEPS_PER_EPOCH:08d}\.pt: "
                     + RESUME_HINT + "latest", said.text), said.text
    assert_files_sound(out)
    assert run(tiny_config(out, **IN_PROCESS), resume="latest", analysis=False) == 0
    assert_same_final_state(reference.state(), newest_state(out))


def test_disk_full_writing_metadata_lists_no_missing_file(tmp_path, one_thread):
    """The metadata.json write after the epoch-2 snapshot fails: the list stays as it was (epoch
    1, whose file exists), nothing is deleted, the run stops (75) and its resume lists epoch 2."""
    FIGURES["scenarios"] += 1
    out = tmp_path / "run"
    cfg = tiny_config(out, **IN_PROCESS, train__save_every=1, train__keep_checkpoints=1)
    with Said() as said:
        assert run(cfg, analysis=False, faults={"write_error": {"match": "metadata.json", "skip": 1}}) == 75
    FIGURES["disk faults survived"] += 1
    assert re.search(r"metadata.json not updated \(checkpoint_epoch_0002\S+ is on disk but not listed\): could not "
                     r"write \S+metadata.json: \[Errno 28\] No space left on device", said.text), said.text
    ck = out / "checkpoints_final"
    meta = ckio.read_metadata(ck)
    assert [e["epoch"] for e in meta] == [1] and all(Path(e["path"]).is_file() for e in meta)
    assert "retention: deleted" not in said.text
    assert not newest_state(out)["finished"]
    assert resume_here(out) == 0
    assert newest_state(out)["finished"] and [e["epoch"] for e in ckio.read_metadata(ck)][-1] == 2


@pytest.mark.parametrize("writer, match", [("the log file", "training_2"), ("TensorBoard", "events.out.tfevents")])
def test_a_full_disk_under_the_log_or_tensorboard_stops_the_run_at_once(reference, tmp_path, one_thread, writer, match):
    """ENOSPC writing a log line (in epoch 2) or TensorBoard's epoch-1 scalars: not logging's or
    the writer thread's traceback and training on, but the one rule: stop at once (75), the
    path named, the state of the last completed step kept, from which the resume ends with the
    straight run's weights."""
    FIGURES["scenarios"] += 1
    out = tmp_path / "run"
    skip = {"the log file": 14, "TensorBoard": 1}[writer]  # log lines before the failing one; TB: its creation
    faults = {"write_error": {"match": match, "skip": skip}}
    with Said() as said:
        assert run(tiny_config(out, **IN_PROCESS, train__log_every=1), analysis=False, faults=faults) == 75
    FIGURES["disk faults survived"] += 1
    assert "Traceback" not in said.text and "Logging error" not in said.text
    assert re.search(r"the run stopped because a file could not be written: could not write \S+"
                     + ("training_\\S+\\.log" if writer == "the log file" else "tb_\\S+")
                     + r": \[Errno 28\] No space left on device .+ \(it needs about \d+(\.\d)? (B|KiB); ", said.text), said.text
    kept = newest_state(out)
    if writer == "TensorBoard":  # at epoch 1's end: back to after its last step
        assert "stopped at the end of epoch 1" in said.text
        assert (kept["epoch"], kept["step_in_epoch"], kept["history"]) == (0, STEPS_PER_EPOCH, [])
    else:
        m = re.search(r"stopped by a failed write after step (\d+) ", said.text)
        assert m and kept["global_step"] == int(m.group(1)) and STEPS_PER_EPOCH <= kept["global_step"] < 12, said.text
    assert resume_here(out) == 0
    assert_same_final_state(reference.state(), newest_state(out))
    assert_files_sound(out)


def test_a_full_disk_for_the_training_curves_stops_after_training_and_the_resume_finishes(tmp_path, one_thread):
    FIGURES["scenarios"] += 1
    out = tmp_path / "run"
    with Said() as said:
        assert run(tiny_config(out, **IN_PROCESS), analysis=False,
                   faults={"write_error": {"match": "training_curves_"}}) == 75
    FIGURES["disk faults survived"] += 1
    assert re.search(r"training is complete and saved, but the analysis after it stopped: a file could not be written: "
                     r"could not write \S+training_curves_\S+\.png: \[Errno 28\] No space left on device .+ \(it needs "
                     r"about \d+\.\d KiB; ", said.text), said.text
    assert f"bash run_learning.sh crossover {out}" in said.text
    assert not list((out / "logs").glob("training_curves_*")) and not list((out / "logs").glob(".training_curves*"))
    assert resume_here(out) == 0
    assert list((out / "logs").glob("training_curves_*.png"))


def test_a_3_mib_disk_refuses_the_run_before_it_trains_saying_how_much_is_needed(scenario):
    """A real 3 MiB tmpfs: not an epoch trained for nothing and a failure at the end, but a stop
    before training (75) naming the folder, what is free and what is needed, in MiB."""
    FIGURES["scenarios"] += 1
    res = scenario["small_disk"].result()
    if "skip" in res:
        pytest.skip(res["skip"])
    text = res["text"]
    assert res["rc"] == 75, text
    FIGURES["disk faults survived"] += 1
    assert "Traceback" not in text and "epoch 1/" not in text
    assert re.search(r"could not write \S+checkpoints_final: not enough disk space for this run's checkpoints: [1-3]\.\d MiB "
                     r"free in \S+, \d\d\.\d MiB needed before training starts \(a resume state of \d+\.\d MiB, a snapshot "
                     r"of \d+\.\d MiB and 64\.0 MiB kept free\)", text), text
    assert "nothing to resume: no training state was saved yet; free space there" in text


def test_a_disk_filled_by_another_program_mid_epoch_stops_the_run_and_it_resumes_exactly(scenario, reference, one_thread):
    """A real 100 MiB tmpfs filled while epoch 2 trains: the next log line fails, the run stops
    at once (75), names the file and the space, keeps the state of epoch 1's end (a new one no
    longer fits); once the space is freed the resume ends with the straight run's weights."""
    FIGURES["scenarios"] += 1
    res = scenario["disk_fills"].result()
    if "skip" in res:
        pytest.skip(res["skip"])
    text, out = res["text"], res["out"]
    assert res["rc"] == 75, text
    FIGURES["disk faults survived"] += 1
    assert "Traceback" not in text and "Logging error" not in text
    # at the first write that needs a new page of the disk: a log line, or the epoch's files at its end
    m = re.search(r"stopped by a failed write after step (\d+) \(epoch 2, |stopped at the end of epoch (2) ", text)
    assert m and (m.group(2) or res["full_at"] <= int(m.group(1)) < EPOCHS * STEPS_PER_EPOCH), text
    assert re.search(r"the run stopped because a file could not be written: could not write \S+: .*\[Errno 28\] No space "
                     r"left on device", text), text
    assert re.search(rf"no new resumable state was written; the last complete one is \S+_step{STEPS_PER_EPOCH:08d}\.pt: "
                     + RESUME_HINT + "latest", text), text
    res["ballast"].unlink()
    assert resume_here(out) == 0
    assert_same_final_state(reference.state(), newest_state(out))
    assert_files_sound(out)


def test_a_disk_without_room_for_the_first_checkpoints_is_refused_before_training(tmp_path, one_thread, monkeypatch):
    FIGURES["scenarios"] += 1
    out = tmp_path / "run"
    real = shutil.disk_usage
    monkeypatch.setattr(ckio.shutil, "disk_usage", lambda p: real(p)._replace(free=3 * 2**20))
    with Said() as said:
        assert run(tiny_config(out, **IN_PROCESS), analysis=False) == 75
    FIGURES["disk faults survived"] += 1
    assert re.search(r"could not write \S+checkpoints_final: not enough disk space for this run's checkpoints: 3\.0 MiB "
                     r"free in \S+, \d\d\.\d MiB needed before training starts \(a resume state of \d+\.\d MiB, a snapshot "
                     r"of \d+\.\d MiB and 64\.0 MiB kept free\)", said.text), said.text
    assert "stopped: a file could not be written before training began" in said.text
    assert "nothing to resume: no training state was saved yet; free space there" in said.text
    assert "epoch 1/" not in said.text


def test_resume_from_a_path_verifies_listed_checksums_and_warns_for_unlisted_files(reference, tmp_path, one_thread):
    """--resume PATH: a snapshot listed in metadata.json is verified (a flipped copy is refused,
    naming it); one that is listed nowhere (copied elsewhere) loads with a warning that its
    checksum cannot be verified, as a warm start."""
    from redheart.run import RunOptions, train

    FIGURES["scenarios"] += 1
    reference.state()
    out = copy_run(reference.out, tmp_path / "run")
    snap = Path(ckio.read_metadata(out / "checkpoints_final")[-1]["path"])
    elsewhere = tmp_path / "elsewhere" / snap.name
    elsewhere.parent.mkdir()
    shutil.copy(snap, elsewhere)
    flip_bytes(snap, rng_for("listed"))
    FIGURES["corruptions caught"] += 1
    with pytest.raises(ckio.CheckpointError, match=rf"checkpoint {re.escape(str(snap))} is corrupted: SHA-256 .+ "
                                                    rf"\(--resume latest takes the newest sound resume state\)"):
        train(tiny_config(out, **IN_PROCESS), RunOptions(resume=str(snap), analysis=False))
    assert train(tiny_config(tmp_path / "warm", **IN_PROCESS), RunOptions(resume=str(elsewhere), analysis=False)) == 0
    log = read_log(tmp_path / "warm")
    assert f"{elsewhere} is not listed in {elsewhere.parent}/metadata.json or resume_states.json: its checksum " \
           f"cannot be verified" in log
    assert "is an epoch snapshot (weights only)" in log
    assert f"nothing to train: the weights are at epoch {EPOCHS} of {EPOCHS} (give --epochs N to train further)" in log


# ---------------------------------------------------------------------------------------
# Signals


def test_sigterm_mid_epoch_exits_75_says_where_to_resume_and_resumes_bit_for_bit(stopped, reference, tmp_path):
    FIGURES["scenarios"] += 1
    assert stopped["rc"] == 75, stopped["text"]
    FIGURES["kills survived"] += 1
    text = stopped["text"]
    assert "SIGTERM received: stopping before the next micro-batch, with a resumable state as of the last " \
           "completed optimizer step" in text
    m = re.search(r"stopped by SIGTERM after step (\d+) \(epoch 2, step (\d+)/6\)", text)
    assert m, text
    step = int(m.group(1))
    assert stopped["k"] <= step < EPOCHS * STEPS_PER_EPOCH
    hint = re.search(r"resume with: bash run_learning.sh unified-train --resume (\S+)   \(or --resume latest\)", text)
    assert hint and hint.group(1).endswith(f"_step{step:08d}.pt") and Path(hint.group(1)).is_file(), text
    entries = read_registry(stopped["out"])
    assert [e["global_step"] for e in entries] == [STEPS_PER_EPOCH, step]
    assert "Traceback" not in text

    out = copy_run(stopped["out"], tmp_path / "run")
    rc, text = cli_run(train_args(out, "--resume", "latest"))  # the CLI end to end, once
    assert rc == 0, text
    assert f"at epoch 2, step {step - STEPS_PER_EPOCH} (global step {step})" in text
    # the data position: it goes on with the next step of the same epoch's plan
    assert re.search(rf"step {step - STEPS_PER_EPOCH + 1}/6 \(global {step + 1}\)", text), text
    assert_same_final_state(reference.state(), newest_state(out))
    assert_files_sound(out)


def test_sigkill_at_random_moments_and_mid_write_then_resume_equals_the_straight_run(scenario, reference, one_thread):
    FIGURES["scenarios"] += 1
    res = scenario["sigkill"].result()
    out = res["tmp"].parents[1]
    assert res["rcs"] == [-signal.SIGKILL] * 3
    FIGURES["kills survived"] += 3
    assert res["tmp_size"], "the kill inside a write leaves a partial file, under its temporary name only"
    assert res["target_sound"]
    assert f"removed 1 temporary file(s) left by an interrupted write: {res['tmp'].name}" in res["p3"]
    # the output directory's lock: the killed process's file stayed, naming it, and blocked no one
    assert res["lock_left"] == res["p1_pid"]
    assert "in use by another run" not in res["p2"] + res["p3"]
    assert read_registry(out) and resume_here(out) == 0
    assert_same_final_state(reference.state(), newest_state(out))
    assert_files_sound(out)


def test_a_kill_without_warning_resumes_from_the_last_timed_state_mid_epoch(scenario, reference, one_thread):
    """train.resume_every_minutes: resume states mid-epoch on a timer, so that a kill -9 resumes
    from the middle of epoch 2 (not from epoch 1's end) and ends where the uninterrupted run
    does; at the default (30 minutes) the uninterrupted run saves none mid-epoch."""
    FIGURES["scenarios"] += 1
    res = scenario["timed_state"].result()
    out, saved = res["out"], res["saved"]
    assert res["rc"] == -signal.SIGKILL, res["text"]
    FIGURES["kills survived"] += 1
    assert re.search(rf"resume state at step {res['k']} \(epoch 2, step {res['k'] - STEPS_PER_EPOCH}/6\): "
                     r"[0-9.e-]+ minutes since the last", res["text"]), res["text"]
    assert res["k"] <= saved < EPOCHS * STEPS_PER_EPOCH, (res["k"], saved)  # in the middle of epoch 2
    assert resume_here(out) == 0
    assert f"at epoch 2, step {saved - STEPS_PER_EPOCH} (global step {saved})" in read_log(out)
    assert_same_final_state(reference.state(), newest_state(out))
    assert_files_sound(out)
    assert "resume state at step" not in reference.proc.text


def test_sigint_twice_stops_at_once_and_the_last_complete_state_resumes(scenario, reference, one_thread):
    """The second Ctrl-C ends the process by the signal within moments, not after the 5 s
    write; it leaves a partial temporary file; the state of epoch 1's end resumes to the same
    final weights."""
    FIGURES["scenarios"] += 1
    res = scenario["sigint"].result()
    out = res["tmp"].parents[1]
    assert res["rc"] == -signal.SIGINT, res["text"]
    assert res["seconds"] < 3
    assert "SIGINT received again: stopping at once" in res["text"]
    assert "stopped by SIGINT" not in res["text"] and res["tmp_left"]
    FIGURES["kills survived"] += 1
    assert [e["global_step"] for e in read_registry(out)] == [STEPS_PER_EPOCH]

    assert resume_here(out) == 0
    log = read_log(out)
    assert f"removed 1 temporary file(s) left by an interrupted write: {res['tmp'].name}" in log
    assert f"at epoch 2, step 0 (global step {STEPS_PER_EPOCH})" in log
    assert_same_final_state(reference.state(), newest_state(out))
    assert_files_sound(out)


@pytest.mark.parametrize("where, step, micro_batch", [("stop_at_micro_batch", STEPS_PER_EPOCH + 2, 2),
                                                      ("stop_in_backward", STEPS_PER_EPOCH + 3, 1),
                                                      ("stop_at_micro_batch", 1, 1)])
def test_a_stop_inside_a_step_leaves_it_and_the_resume_redoes_it_exactly(reference, tmp_path, one_thread, where, step,
                                                                         micro_batch):
    """A stop request met before micro-batch 3 of step 8, inside the backward of micro-batch 2
    of step 9 (at a layer's gradient: on the CPU one micro-batch of 730m takes a minute), or
    before micro-batch 2 of the very first step: the step's partial gradients are dropped, the
    RNG streams put back, and the state is that of the step before (of step 0: no weights, only
    their fingerprint, as they are the seed's), from which the resume ends where the straight
    run does, bit for bit."""
    FIGURES["scenarios"] += 1
    out = tmp_path / "run"
    assert run(tiny_config(out, **IN_PROCESS), analysis=False, faults={where: [step, micro_batch]}) == 75
    FIGURES["stops mid-step"] += 1
    epoch, done = (step - 1) // STEPS_PER_EPOCH + 1, (step - 1) % STEPS_PER_EPOCH
    assert (f"stopped by a test's stop request after step {step - 1} (epoch {epoch}, step {done}/{STEPS_PER_EPOCH}); "
            f"step {step}, left midway, is redone on resume") in read_log(out)
    entry = read_registry(out)[-1]
    state = ckio.load(entry["path"], entry["sha256"])
    assert state["global_step"] == step - 1 and state["step_in_epoch"] == done
    if step == 1:
        assert state["weights"] == "initial" and state["model_state"] == {} and entry["size_bytes"] < 200_000
    assert resume_here(out) == 0
    assert_same_final_state(reference.state(), newest_state(out))
    assert_files_sound(out)


@pytest.mark.skipif("timeout" not in SCENARIOS, reason="needs GNU timeout")
def test_timeout_from_the_guide_stops_cleanly_with_a_resumable_state(scenario, reference, one_thread):
    """timeout sends SIGTERM to the child and again to its group: the run stops cleanly
    (timeout exits 124) and `--resume latest` ends with the uninterrupted run's weights (the
    quick test without the LR sweep trains the same steps as unified-train)."""
    FIGURES["scenarios"] += 1
    res = scenario["timeout"].result()
    text = res["text"]
    assert res["rc"] == 124, text
    FIGURES["kills survived"] += 1
    assert "SIGTERM received" in text and "Traceback" not in text
    hint = re.search(r"resume with: bash run_learning.sh unified-test --resume (\S+resume_state_\S+)", text)
    assert hint, text
    out = Path(hint.group(1)).parents[1]
    assert resume_here(out) == 0
    assert_same_final_state(reference.state(), newest_state(out))
    assert_files_sound(out)


def test_a_signal_before_training_begins_stops_at_once_with_nothing_to_resume(scenario):
    """SIGTERM while the session is being built (encoder, data): nothing was trained, so the
    process stops at once with 75 and says there is nothing to resume."""
    FIGURES["scenarios"] += 1
    res = scenario["setup"].result()
    assert res["rc"] == 75, res["text"]
    FIGURES["kills survived"] += 1
    assert "stopped by SIGTERM before training began" in res["text"]
    assert "nothing to resume: no training state was saved yet; run the command again" in res["text"]
    assert "Traceback" not in res["text"]


def test_a_kill_while_registering_the_first_state_strands_nothing(scenario, reference, one_thread):
    """The complete state the registry does not list is found by --resume latest (its checksum
    from the side file written before the rename), a new run without --restart is refused
    because of it, and it is adopted into the registry; the resumed run ends as the straight one."""
    from redheart.run import UsageError

    FIGURES["scenarios"] += 1
    res = scenario["registering"].result()
    out, ck = res["out"], res["out"] / "checkpoints_final"
    assert res["rc"] == -signal.SIGKILL, res["text"]
    FIGURES["kills survived"] += 1
    state = res["states"][0]
    assert [p.name for p in res["states"]] == [state.name, state.name + ".json"]  # the state and its side file
    assert state.name.endswith(f"_step{STEPS_PER_EPOCH:08d}.pt") and not (ck / "resume_states.json").exists()
    side = json.loads((ck / (state.name + ".json")).read_text())
    assert side["sha256"] == ckio.sha256_file(state) and side["global_step"] == STEPS_PER_EPOCH

    found, entry = find_resume_state(out)  # what --resume latest loads, with no registry
    assert Path(entry["path"]) == state and entry["sha256"] == side["sha256"] and found["global_step"] == STEPS_PER_EPOCH
    said: list[logging.LogRecord] = []
    catch = logging.Handler()
    catch.emit = said.append
    logging.getLogger("redheart").addHandler(catch)
    try:
        with pytest.raises(UsageError, match=rf"holds an unfinished run \(\S+, epoch 1, step {STEPS_PER_EPOCH}\)\. "
                                             rf"Continue it with --resume latest, start anew with --restart"):
            run(tiny_config(out, **IN_PROCESS), analysis=False)
    finally:
        logging.getLogger("redheart").removeHandler(catch)
    assert any(f"found {state.name} (run " in r.getMessage() and "it is complete and now registered" in r.getMessage()
               for r in said), [r.getMessage() for r in said]
    assert [(Path(e["path"]), e["sha256"]) for e in read_registry(out)] == [(state, side["sha256"])]  # adopted
    assert not (ck / (state.name + ".json")).exists()
    assert resume_here(out) == 0
    log = read_log(out)
    assert f"removed 1 temporary file(s) left by an interrupted write: {res['tmp'].name}" in log
    assert_same_final_state(reference.state(), newest_state(out))
    assert_files_sound(out)


def test_unregistered_states_that_are_not_sound_are_set_aside_and_stale_side_files_removed(stopped, tmp_path):
    """Orphans that do not verify (a checksum that does not match its side file; cut short,
    without one) are renamed .corrupt instead of adopted; side files whose state never came
    or is registered are removed."""
    from redheart.ckpt.state import adopt_orphans, sidecar_path

    FIGURES["scenarios"] += 1
    out = copy_run(stopped["out"], tmp_path / "run")
    ck = out / "checkpoints_final"
    first, newest = (Path(e["path"]) for e in read_registry(out))
    (ck / "resume_states.json").write_text(json.dumps([read_registry(out)[0]]))  # the newest unregistered
    sidecar_path(newest).write_text(json.dumps({"sha256": "0" * 64, "global_step": 1}))
    cut = ck / "resume_state_other_step00000003.pt"
    cut.write_bytes(first.read_bytes()[:5000])
    sidecar_path(ck / "resume_state_gone_step00000001.pt").write_text("{}")
    sidecar_path(first).write_text("{}")
    FIGURES["corruptions caught"] += 2
    assert adopt_orphans(out) == []
    assert [Path(e["path"]) for e in read_registry(out)] == [first]
    assert sorted(p.name for p in ck.glob("resume_state_*")) == sorted(
        [first.name, newest.name + ".corrupt", cut.name + ".corrupt"])


def test_two_runs_at_once_in_one_directory_one_trains_the_other_is_refused(scenario):
    """The second run while one is live is refused at once (exit 2), naming the live one; the
    first trains to the end, alone in the directory."""
    FIGURES["scenarios"] += 1
    res = scenario["two_runs"].result()
    (rc_a, text_a, pid_a), (rc_b, text_b, pid_b) = res["results"]
    assert sorted([rc_a, rc_b]) == [0, 2], text_a + text_b
    (won, won_pid), (lost, _) = ((text_a, pid_a), (text_b, pid_b)) if rc_a == 0 else ((text_b, pid_b), (text_a, pid_a))
    FIGURES["concurrent runs refused"] += 1
    assert re.search(rf"^error: {re.escape(str(res['out']))} is in use by another run: pid {won_pid} \(redheart "
                     rf"unified-train .+\)\. Two runs in one output directory would overwrite each other's "
                     rf"checkpoints\. Wait for it to end, stop it \(kill -TERM {won_pid}: .+\), or give this run "
                     rf"another --output-dir$", lost, re.M), lost
    assert "Traceback" not in lost and "training run" not in lost  # refused before it began
    assert re.search(r"Run \d{8}_\d{6} finished: 1 epochs", won), won
    assert len(list((res["out"] / "logs").glob("training_*.log"))) == 1
    assert not (res["out"] / ".redheart.lock").exists()  # a run that ends removes it
    assert_files_sound(res["out"])


# ---------------------------------------------------------------------------------------
# Corruption


def test_a_corrupted_newest_resume_state_is_named_and_the_previous_one_resumes(stopped, reference, tmp_path, one_thread):
    FIGURES["scenarios"] += 1
    out = copy_run(stopped["out"], tmp_path / "run")
    newest = Path(read_registry(out)[-1]["path"])
    flip_bytes(newest, rng_for("flip"))
    FIGURES["corruptions caught"] += 1
    assert resume_here(out) == 0
    text = read_log(out)
    assert re.search(rf"skipping {re.escape(newest.name)}: checkpoint \S+ is corrupted: SHA-256 \w+\.\.\. does "
                     rf"not match the recorded \w+\.\.\.", text), text
    assert f"resuming from the previous good state {Path(read_registry(stopped['out'])[0]['path']).name}" in text
    assert f"at epoch 2, step 0 (global step {STEPS_PER_EPOCH})" in text
    assert newest.with_name(newest.name + ".corrupt").is_file()  # kept aside, out of the registry
    assert_same_final_state(reference.state(), newest_state(out))
    assert_files_sound(out)


@pytest.mark.parametrize("damage", ["truncated", "deleted", "registry garbage", "registry not a list"])
def test_resume_latest_falls_back_past_damage(stopped, tmp_path, damage):
    """What --resume latest loads (find_resume_state) when the newest state is cut short or gone,
    or when resume_states.json itself is unreadable (the folder is scanned instead)."""
    FIGURES["scenarios"] += 1
    out = copy_run(stopped["out"], tmp_path / "run")
    entries = read_registry(out)
    newest, previous = Path(entries[-1]["path"]), Path(entries[0]["path"])
    registry = out / "checkpoints_final" / "resume_states.json"
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    elif damage == "deleted":
        newest.unlink()
    elif damage == "registry garbage":
        registry.write_bytes(b"\x00{not json")
    else:
        registry.write_text('{"path": 3}')
    FIGURES["corruptions caught"] += 1
    state, entry = find_resume_state(out)
    expect = newest if damage.startswith("registry") else previous
    assert Path(entry["path"]) == expect
    assert same_tensors(state["model_state"], ckio.load(stopped["out"] / "checkpoints_final" / expect.name)["model_state"]) == []


def test_unreadable_registry_and_metadata_do_not_stop_a_resumed_run(stopped, reference, tmp_path, one_thread):
    """Both lists garbage: the resume finds its state by scanning, the snapshot save moves the bad
    metadata.json aside and rebuilds it, and the run ends with the straight run's weights."""
    FIGURES["scenarios"] += 1
    out = copy_run(stopped["out"], tmp_path / "run")
    ck = out / "checkpoints_final"
    (ck / "resume_states.json").write_text("[{\"path\": ")
    (ck / "metadata.json").write_text("{{{")
    FIGURES["corruptions caught"] += 2
    assert run(tiny_config(out, **IN_PROCESS), resume="latest", analysis=False) == 0
    log = next((out / "logs").glob("training_*.log")).read_text()
    assert "metadata.json is not valid JSON" in log and "rebuilding it from the snapshot files" in log
    assert list(ck.glob("metadata.json.corrupt-*"))
    assert [e["epoch"] for e in ckio.read_metadata(ck)] == [2]
    assert_same_final_state(reference.state(), newest_state(out))
    assert_files_sound(out)


def test_a_corrupted_snapshot_fails_validate_and_is_refused_by_crossover(scenario):
    FIGURES["scenarios"] += 1
    res = scenario["snapshot"].result()
    name = re.escape(res["snap"].name)
    FIGURES["corruptions caught"] += 1
    rc, text = res["validate"]
    assert rc == 1, text
    assert re.search(rf"\[FAIL\] checkpoints .*1 of 3 checkpoint\(s\) bad: checkpoint \S+{name} is corrupted: SHA-256",
                     text), text
    rc, text = res["crossover"]
    assert rc == 2 and "Traceback" not in text, text
    assert re.search(rf"^error: checkpoint \S+{name} is corrupted: SHA-256 \w+\.\.\. does not match "
                     rf"the recorded \w+\.\.\.$", text, re.M), text


def test_a_checkpoint_carrying_pickled_code_is_refused_by_resume_and_predict(scenario):
    FIGURES["scenarios"] += 1
    res = scenario["pickled"].result()
    FIGURES["corruptions caught"] += 2
    rc, text = res["resume"]
    assert rc == 2 and "Traceback" not in text, text
    assert text.strip().splitlines()[-1] == (
        f"error: refused to load {res['evil']}: it holds pickled Python objects (posix.system), not only tensors "
        f"and plain values, and loading it could run code. Only checkpoints written by this system load. "
        f"(--resume latest takes the newest sound resume state)")
    rc, text = res["predict"]
    assert rc == 2 and "Traceback" not in text, text
    assert re.fullmatch(rf"error: refused to load {re.escape(str(res['custom']))}: it holds pickled Python objects "
                        rf"\(\S*Payload\), not only tensors and plain values, and loading it could run code\. "
                        rf"Only checkpoints written by this system load\.", text.strip().splitlines()[-1]), text
    assert not res["marker"].exists()


# ---------------------------------------------------------------------------------------
# Numerical faults and the exact resume of the OOM state and the Sweet Spot history


def test_max_bad_steps_in_a_row_stop_with_exit_5_keeping_the_last_good_state(scenario, reference, one_thread):
    """Three NaN losses in a row from step 7 with train.max_bad_steps=3: exit 5, and the state
    kept is the one after step 6, bit for bit; it resumes to the end."""
    FIGURES["scenarios"] += 1
    res = scenario["nan"].result()
    out, text = res["out"], res["text"]
    assert res["rc"] == 5, text
    FIGURES["non-finite steps skipped"] += 3
    assert "3 optimizer steps in a row had a non-finite loss or gradient; the last good state is kept" in text
    assert re.search(r"resume with: bash run_learning.sh unified-train --resume \S+_step00000009\.pt", text)
    kept, good = newest_state(out), reference.state_at(STEPS_PER_EPOCH)
    assert kept["global_step"] == 9 and kept["bad_steps_in_row"] == 3
    assert same_tensors(kept["model_state"], good["model_state"]) == []
    assert same_tensors(kept["ema"]["shadow"], good["ema"]["shadow"]) == []
    for k in good["optimizer"]["state"]:
        assert same_tensors(kept["optimizer"]["state"][k], good["optimizer"]["state"][k]) == []
    assert resume_here(out) == 0
    final = newest_state(out)
    assert final["finished"] and final["global_step"] == 12 and final["history"][-1]["bad_steps"] == 3




def test_resume_after_an_oom_keeps_the_smaller_micro_batch_and_the_sweet_spot_history(scenario, one_thread):
    """An injected OOM at step 2 halves the micro-batch; a stop in epoch 2 and a resume continue
    with that micro-batch and end equal to the uninterrupted run with the same OOM, including the
    metrics history that Sweet Spot reads and its choices."""
    from redheart.ckpt.sweetspot import analyse

    FIGURES["scenarios"] += 1
    res = scenario["oom"].result()
    (a, rc_a, text_a), (b, rc_b, text_b) = res["straight"], res["stopped"]
    assert rc_a == 0, text_a
    assert rc_b == 75, text_b
    assert "out of memory at step 2: retry with micro-batch 1 (accumulation x2)" in text_a
    straight, mid = newest_state(a), newest_state(b)
    assert straight["micro_batch"] == 1 and len(straight["oom_events"]) == 1
    assert mid["micro_batch"] == 1 and mid["global_step"] == 9
    assert resume_here(b) == 0
    resumed = newest_state(b)
    assert resumed["micro_batch"] == 1
    keys = ("step", "epoch", "attempt", "micro_batch_before", "micro_batch_after", "action")
    assert [{k: e[k] for k in keys} for e in resumed["oom_events"]] == [{k: e[k] for k in keys} for e in straight["oom_events"]]
    assert_same_final_state(straight, resumed)
    cfg = tiny_config(b, **IN_PROCESS)
    assert analyse(resumed["history"], {1, 2}, cfg, "raw") == analyse(straight["history"], {1, 2}, cfg, "raw")
