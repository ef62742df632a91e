"""Every command the user's guide and the README show, run as the user runs it.

The guide is TRAINING_MODES_GUIDE.md beside the project (../shared/seed/); the README is this
repository's. Each command runs as a real process from the repository root, `bash
run_learning.sh ...` as the shell script itself, with `training/` (and the user's files:
texts.txt, my_data.jsonl, training.log) pointed under pytest's tmp_path and, where it keeps the
test fast on a 2-core CPU, flags appended (`--preset tiny --max-records 40`, fewer epochs, no LR
sweep); each test checks the exit code and an output the command is for.

- CASES: one test per distinct command (the commands of a chain, a resume and the run it
  resumes, in one test). The commands that only read a finished run share one: the plain
  `bash run_learning.sh unified-test`, run once for the module.
- SKIPPED: the commands not run, each with its reason (a GPU, a server, the environment itself).
- test_every_shown_command_is_covered parses both documents (```bash blocks, `python ...` lines,
  and the inline code that names run_learning.sh or python) and fails on a command that is in
  neither table, so that a command added to a document cannot be silently left out.
- The guide's and the README's ```python snippets run against the shared run's outputs.

The commands run WORKERS at a time (2 on 2 cores), each process with one compute thread so that
they share the cores instead of contending for them: every selected case starts when the
module's first test does, and each test waits for its own.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from helpers import newest_state

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
GUIDE = ROOT.parent / "shared" / "seed" / "TRAINING_MODES_GUIDE.md"
DOCS = {"README.md": README, "guide": GUIDE}

WORKERS = max(1, min(4, os.cpu_count() or 1))
THREADS = str(max(1, (os.cpu_count() or 1) // WORKERS))
TIMEOUT = 600  # one command; a hang fails its test instead of the suite

TRAIN = "--preset tiny --max-records 40"  # the tiny preset, also on a GPU machine; 32 training records
QUICK = f"{TRAIN} --no-lr-sweep"
SMALL_SWEEP = "--set sweep.steps=6 --set sweep.eval_every=3 --set sweep.score_last=2"
HEADS = ("emotion", "bentham", "regret", "surd")
MODULES = {"backbone", *HEADS}


# ---------------------------------------------------------------------------------------------
# what the documents show


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each ``` block."""
    return re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def _without_comment(line: str) -> str:
    return " ".join(re.sub(r"(^|\s)#.*$", "", line).split())


def _is_command_block(body: str) -> bool:
    """A ```python block holding shell lines (`python training/...`), not Python."""
    lines = [_without_comment(x) for x in body.splitlines()]
    lines = [x for x in lines if x]
    return bool(lines) and all(re.match(r"python3?\s", x) for x in lines)


def shown_commands(text: str) -> list[str]:
    """The commands a document shows: every line of its ```bash blocks and of its ```python
    blocks of shell lines (comments dropped, spaces collapsed), and every inline code span that
    runs run_learning.sh, python or a program of red_heart_env."""
    found = []
    for lang, body in fenced_blocks(text):
        if lang == "bash" or (lang == "python" and _is_command_block(body)):
            found += [c for c in map(_without_comment, body.splitlines()) if c]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        span = " ".join(span.split())
        if re.search(r"run_learning\.sh\s+\S", span) or re.match(r"(python3?|red_heart_env/bin/\S+)\s", span):
            found.append(span)
    return found


def python_snippets(text: str) -> list[str]:
    """The ```python blocks that are Python; a block offering alternatives (`# 또는 ...`, `# or
    ...`) gives one snippet per alternative."""
    out = []
    for lang, body in fenced_blocks(text):
        if lang != "python" or _is_command_block(body):
            continue
        first, *others = [p for p in re.split(r"^(?=#\s*(?:또는|[Oo]r)\b)", body, flags=re.M) if p.strip()]
        imports = "".join(x + "\n" for x in first.splitlines() if re.match(r"(import|from)\s", x))
        out += [first, *(imports + p for p in others)]  # an alternative with the block's imports
    return out


def _doc_text(name: str) -> str | None:
    path = DOCS[name]
    return path.read_text(encoding="utf-8") if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# running a command


def command_env(extra: dict | None = None, activated: bool = False) -> dict:
    """The caller's environment without the variables a command reads (SAMPLES, test faults),
    one compute thread per process; `activated`: red_heart_env's bin first on PATH, as after
    the guide's `source red_heart_env/bin/activate` (what `python -m redheart`/`python -c
    "import torch..."` assume)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SAMPLES", "REDHEART_FAULTS")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS)
    if activated or not shutil.which("python", path=env.get("PATH")):
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def sh(script: str, cwd: Path = ROOT, env: dict | None = None, activated: bool = False) -> subprocess.CompletedProcess:
    """`script` under bash (errors of any part of it or of a pipe count); on a timeout its
    whole process group goes."""
    proc = subprocess.Popen(["bash", "-c", "set -eo pipefail\n" + script], cwd=cwd, env=command_env(env, activated),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"timed out after {TIMEOUT} s: {script}") from None
    return subprocess.CompletedProcess(script, proc.returncode, out, err)


def as_run(line: str, out: Path, files: Path, extra: str = "", replace: dict | None = None) -> str:
    """A shown command as it runs here: `training` (the default output directory) -> `out`, the
    user's files -> `files`, in the foreground (no trailing &), `extra` appended before any
    redirection."""
    s = re.sub(r"\s*&$", "", line)
    for old, new in (replace or {}).items():
        s = s.replace(old, new)
    s = re.sub(r"(?<![\w./-])training/(?![\w./-]*\.py\b)", f"{out}/", s)  # not the scripts in training/
    s = re.sub(r"(?<=\s)training(?=\s|$)", str(out), s)
    for name in ("texts.txt", "my_data.jsonl", "training.log"):
        s = re.sub(rf"(?<![\w./-]){re.escape(name)}", str(files / name), s)
    if extra:
        m = re.search(r"\s(?:\d?>|<)", s)
        s = f"{s[:m.start()]} {extra}{s[m.start():]}" if m else f"{s} {extra}"
    return s


class Work:
    """One case's folders (`out`: the output directory, `files`: the user's files) and the
    shared run."""

    def __init__(self, root: Path, jobs: Jobs):
        self.out, self.files, self.jobs = root / "out", root / "files", jobs
        self.files.mkdir(parents=True, exist_ok=True)
        self.od = f"--output-dir {self.out}"

    def run(self, line: str, extra: str = "", env: dict | None = None, expect: int = 0, out: Path | None = None,
            replace: dict | None = None, activated: bool = False) -> subprocess.CompletedProcess:
        script = as_run(line, out or self.out, self.files, extra, replace)
        proc = sh(script, env=env, activated=activated)
        assert proc.returncode == expect, (f"`{line}` run as `{script}`: exit code {proc.returncode}, expected {expect}"
                                           f"\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
        return proc

    def shared(self) -> Shared:
        return self.jobs.shared()

    def shared_copy(self) -> Path:
        """A copy of the shared run, for a command that writes into the run it reads."""
        dst = self.out.parent / "run_copy"
        shutil.copytree(self.shared().out, dst)
        return dst


# ---------------------------------------------------------------------------------------------
# what a run left


def run_ids(out: Path) -> list[str]:
    return sorted(p.stem.removeprefix("metrics_") for p in (out / "logs").glob("metrics_*.jsonl"))


def metrics(out: Path, run_id: str | None = None) -> list[dict]:
    run_id = run_id or run_ids(out)[-1]
    text = (out / "logs" / f"metrics_{run_id}.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def epochs(out: Path, run_id: str | None = None) -> list[int]:
    return [m["epoch"] for m in metrics(out, run_id)]


def snapshots(out: Path) -> list[dict]:
    return json.loads((out / "checkpoints_final" / "metadata.json").read_text())


def final_model(out: Path) -> dict:
    """crossover_final.pth, loaded with PyTorch's safe default (SPEC §7)."""
    path = out / "checkpoints_final" / "crossover_final.pth"
    assert path.is_file(), f"no {path}"
    ckpt = torch.load(path)
    assert set(ckpt["source_epochs"]) == MODULES and ckpt["model_state"]
    return ckpt


def finished(proc: subprocess.CompletedProcess, out: Path) -> None:
    """A training command's end: its summary and the Crossover model."""
    assert re.search(r"Run \d{8}_\d{6} finished: \d+ epochs", proc.stderr), proc.stderr[-3000:]
    final_model(out)


def predictions(stdout: str, n: int) -> list[dict]:
    """`n` JSON lines with the four heads, each in its range."""
    lines = [json.loads(x) for x in stdout.splitlines() if x.startswith("{")]
    assert len(lines) == n, stdout
    for p in lines:
        assert p["text"] and set(HEADS) <= set(p)
        assert len(p["emotion"]) == 7 and abs(sum(p["emotion"].values()) - 1) < 1e-3
        assert len(p["bentham"]) == 10 and all(0 <= v <= 1 for v in p["bentham"].values())
        assert 0 <= p["regret"] <= 1
        assert len(p["surd"]) == 4 and abs(sum(p["surd"].values()) - 1) < 1e-3
    return lines


# ---------------------------------------------------------------------------------------------
# the cases


@dataclass
class Case:
    name: str
    shown: tuple[str, ...]  # the command lines as the documents show them
    fn: Callable[[Work], None]
    shared: bool  # reads the shared run
    cost: float  # seconds, about: the longest start first
    slow: bool = False


CASES: dict[str, Case] = {}


def case(*shown: str, shared: bool = False, cost: float = 10, slow: bool = False):
    def register(fn):
        CASES[fn.__name__] = Case(fn.__name__, shown, fn, shared, cost, slow)
        return fn

    return register


@dataclass
class Shared:
    out: Path
    run_id: str
    proc: subprocess.CompletedProcess


def shared_run(work: Work) -> Shared:
    """The plain `bash run_learning.sh unified-test`: LR sweep (5 rates, shortened) -> 2 epochs
    -> Sweet Spot -> Crossover, read by every case that reads a finished run."""
    proc = work.run("bash run_learning.sh unified-test", f"{TRAIN} {SMALL_SWEEP} {work.od}")
    (run_id,) = run_ids(work.out)
    return Shared(work.out, run_id, proc)


@case("bash run_learning.sh unified-test", shared=True, cost=20)
def unified_test(w: Work) -> None:
    s = w.shared()
    finished(s.proc, s.out)
    assert epochs(s.out) == [1, 2]  # 2 epochs by default
    sweep = json.loads(next((s.out / "lr_sweep_results").glob("lr_sweep_*.json")).read_text())
    assert len([p for p in sweep["points"] if not p.get("refine")]) == 5 and sweep["selected"]
    assert [e["epoch"] for e in snapshots(s.out)] == [1, 2]
    assert len(list((s.out / "sweet_spot_analysis" / "plots").glob("*.png"))) == len(MODULES)
    assert (s.out / "logs" / f"training_curves_{s.run_id}.png").stat().st_size > 10_000
    assert list((s.out / "logs" / f"tb_{s.run_id}").glob("events.out.tfevents.*"))  # what TensorBoard reads
    assert "use it: bash run_learning.sh predict --checkpoint" in s.proc.stderr


@case("SAMPLES=3 bash run_learning.sh unified-test", cost=12)
def unified_test_samples_3(w: Work) -> None:
    finished(w.run("SAMPLES=3 bash run_learning.sh unified-test", f"{QUICK} {w.od}"), w.out)
    assert epochs(w.out) == [1, 2, 3]


@case("SAMPLES=5 bash run_learning.sh unified-test", cost=15)
def unified_test_samples_5(w: Work) -> None:
    finished(w.run("SAMPLES=5 bash run_learning.sh unified-test", f"{QUICK} {w.od}"), w.out)
    assert epochs(w.out) == [1, 2, 3, 4, 5]


def _every_step_logged(proc: subprocess.CompletedProcess) -> None:
    """--verbose: a line for every optimizer step (2 an epoch here), not every log_every."""
    assert re.search(r"epoch 1/\d+ step 1/2 ", proc.stderr), proc.stderr[-3000:]


@case("bash run_learning.sh unified-test --debug --verbose", cost=10)
def unified_test_debug_verbose(w: Work) -> None:
    proc = w.run("bash run_learning.sh unified-test --debug --verbose", f"--samples 1 {QUICK} {w.od}")
    finished(proc, w.out)
    _every_step_logged(proc)


@case("nohup timeout 1200 bash run_learning.sh unified-test --samples 3 --debug --verbose &", cost=12)
def unified_test_nohup_timeout(w: Work) -> None:
    # in the foreground, so that its exit code is seen; under nohup and a pipe: plain lines
    proc = w.run("nohup timeout 1200 bash run_learning.sh unified-test --samples 3 --debug --verbose &",
                 f"{QUICK} {w.od}")
    finished(proc, w.out)
    _every_step_logged(proc)
    assert epochs(w.out) == [1, 2, 3]


@case("SAMPLES=3 bash run_learning.sh unified-test --debug", cost=12)
def unified_test_samples_3_debug(w: Work) -> None:
    finished(w.run("SAMPLES=3 bash run_learning.sh unified-test --debug", f"{QUICK} {w.od}"), w.out)
    assert epochs(w.out) == [1, 2, 3]


@case("bash run_learning.sh unified-test --debug", cost=10)
def unified_test_debug(w: Work) -> None:
    # --debug logs at DEBUG level; on a CPU nothing more is said (its messages are about CUDA graphs)
    finished(w.run("bash run_learning.sh unified-test --debug", f"--samples 1 {QUICK} {w.od}"), w.out)


@case("bash run_learning.sh unified-test --verbose", cost=10)
def unified_test_verbose(w: Work) -> None:
    proc = w.run("bash run_learning.sh unified-test --verbose", f"--samples 1 {QUICK} {w.od}")
    finished(proc, w.out)
    _every_step_logged(proc)


@case("bash run_learning.sh unified-test --batch-size 1", cost=10)
def unified_test_batch_size_1(w: Work) -> None:
    proc = w.run("bash run_learning.sh unified-test --batch-size 1", f"--samples 1 {QUICK} {w.od}")
    finished(proc, w.out)
    assert "effective batch 16 = micro-batch 1 x accumulation 16" in proc.stderr  # the effective batch kept


@case("bash run_learning.sh unified-train", cost=13)
def unified_train(w: Work) -> None:
    # 2 epochs instead of 60: a snapshot every even epoch
    finished(w.run("bash run_learning.sh unified-train", f"--epochs 2 {TRAIN} {w.od}"), w.out)
    assert epochs(w.out) == [1, 2] and [e["epoch"] for e in snapshots(w.out)] == [2]


@case("nohup bash run_learning.sh unified-train > training.log 2>&1 &", cost=12)
def unified_train_nohup(w: Work) -> None:
    # `tail -f training.log` (not run: it follows the file for ever) shows this file
    w.run("nohup bash run_learning.sh unified-train > training.log 2>&1 &", f"--epochs 1 {TRAIN} {w.od}")
    log = (w.files / "training.log").read_text()
    assert re.search(r"Run \d{8}_\d{6} finished: 1 epochs", log) and "epoch 1/1: train loss" in log, log[-3000:]
    final_model(w.out)


RESUME = ("bash run_learning.sh unified-train --epochs 30",
          "LATEST=$(ls -t training/checkpoints_final/*.pt | head -1)",
          "bash run_learning.sh unified-train --resume $LATEST",
          "bash run_learning.sh unified-train --resume training/checkpoints_final/resume_state_<run>_step<N>.pt",
          "bash run_learning.sh unified-train --resume latest",
          "bash run_learning.sh unified-train --resume training/checkpoints_final/checkpoint_epoch_0020.pt")


@case(*RESUME, cost=50)
def unified_train_stopped_and_resumed(w: Work) -> None:
    """A run stopped three times (as Ctrl-C or `timeout` stop it: exit code 75 after a step,
    with a resume state; here by the test suite's stop request after global step N), resumed
    each time by another of the documents' forms, then a new run from an epoch snapshot."""
    def stop_after(step: int) -> dict:
        return {"REDHEART_FAULTS": json.dumps({"stop_at_step": step})}

    def resumed_at(proc: subprocess.CompletedProcess, step: int) -> None:
        assert re.search(rf"resumed run {run_id} at epoch \d+, step \d+ \(global step {step}\)", proc.stderr), \
            proc.stderr[-3000:]

    epochs30, latest_line, latest_resume, by_path, latest, snapshot = RESUME
    proc = w.run(epochs30, f"{TRAIN} {w.od}", env=stop_after(2), expect=75)
    assert "training  30 epochs x 2 optimizer steps" in proc.stderr and "epoch 1/30 step 2/2" in proc.stderr
    run_id = re.search(r"training run (\d{8}_\d{6})", proc.stderr).group(1)
    # the guide: the newest *.pt (the resume state just written), run as one script
    script = as_run(latest_line, w.out, w.files) + "\n" + as_run(latest_resume, w.out, w.files, f"{TRAIN} {w.od}")
    proc = sh(script, env=stop_after(4))
    assert proc.returncode == 75, proc.stderr[-3000:]
    resumed_at(proc, 2)
    # the README: a resume state by its path
    state = f"resume_state_{run_id}_step{4:08d}.pt"
    assert (w.out / "checkpoints_final" / state).is_file()
    proc = w.run(by_path, f"{TRAIN} {w.od}", env=stop_after(6), expect=75,
                 replace={"resume_state_<run>_step<N>.pt": state})
    resumed_at(proc, 4)
    # --resume latest, to the end (4 epochs of the 30: the schedule is recomputed for 4)
    proc = w.run(latest, f"--epochs 4 {TRAIN} {w.od}")
    resumed_at(proc, 6)
    finished(proc, w.out)
    assert epochs(w.out, run_id) == [1, 2, 3, 4] and newest_state(w.out)["global_step"] == 8
    # the guide: an epoch snapshot (the run's epoch 2; the guide's name has no LR and time stamp)
    snap = next(e for e in snapshots(w.out) if e["epoch"] == 2)["file"]
    proc = w.run(snapshot, f"--epochs 4 {TRAIN} {w.od}", replace={"checkpoint_epoch_0020.pt": snap})
    assert "is an epoch snapshot (weights only): training continues from its weights" in proc.stderr
    finished(proc, w.out)
    new_run = run_ids(w.out)[-1]
    assert new_run != run_id and epochs(w.out, new_run) == [3, 4]


@case("bash run_learning.sh unified-train --batch-size auto", cost=13)
def unified_train_batch_size_auto(w: Work) -> None:
    proc = w.run("bash run_learning.sh unified-train --batch-size auto", f"--epochs 1 {TRAIN} {w.od}")
    finished(proc, w.out)
    assert re.search(r"--batch-size auto: micro-batch \d+ x accumulation \d+", proc.stderr), proc.stderr[-3000:]


@case("bash run_learning.sh unified-train --batch-size 64 --set train.compile=true", cost=90, slow=True)
def unified_train_compiled(w: Work) -> None:
    # slow: Inductor compiles the layers on the CPU for 50-90 s (the setting is for a large GPU)
    proc = w.run("bash run_learning.sh unified-train --batch-size 64 --set train.compile=true",
                 f"--epochs 1 {TRAIN} {w.od}")
    finished(proc, w.out)
    assert "layers compiled (torch.compile" in proc.stderr and "micro-batch 64" in proc.stderr


@case("bash run_learning.sh unified-train --data my_data.jsonl", cost=12)
def unified_train_own_data(w: Work) -> None:
    lines = (ROOT / "redheart" / "sample_data" / "sample_en.jsonl").read_text().splitlines()[:60]
    (w.files / "my_data.jsonl").write_text("\n".join(lines) + "\n")  # canonical JSONL
    proc = w.run("bash run_learning.sh unified-train --data my_data.jsonl", f"--epochs 1 --preset tiny {w.od}")
    finished(proc, w.out)
    assert str(w.files / "my_data.jsonl") in proc.stderr
    split = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+(train|val|test)\s+(\d+)", proc.stderr, re.M)}
    assert sum(split.values()) == 60, proc.stderr[-3000:]


@case("bash run_learning.sh unified-test-v1", cost=9)
def unified_test_v1(w: Work) -> None:
    # the tiny preset: the legacy presets' own run needs 18 GB and 16 min on this CPU (README);
    # their sizes are checked by tests/test_presets.py
    proc = w.run("bash run_learning.sh unified-test-v1", f"--preset tiny --samples 1 {w.od}")
    finished(proc, w.out / "tiny")


@case("bash run_learning.sh train-local", cost=9)
def train_local(w: Work) -> None:
    proc = w.run("bash run_learning.sh train-local", f"--preset tiny {w.od}")
    assert newest_state(w.out)["epoch_stats"]["samples"] == 3  # SAMPLES: 3 by default
    mem = json.loads(next((w.out / "logs").glob("memory_*.json")).read_text())
    assert mem["samples"] and mem["summary"]["largest_micro_batch"] >= 1
    assert "largest micro-batch that fits" in proc.stderr


@case("SAMPLES=10 bash run_learning.sh train-local", cost=9)
def train_local_samples_10(w: Work) -> None:
    w.run("SAMPLES=10 bash run_learning.sh train-local", f"--preset tiny {w.od}")
    assert newest_state(w.out)["epoch_stats"]["samples"] == 10
    assert next((w.out / "logs").glob("memory_*.png")).stat().st_size > 5_000


@case("bash run_learning.sh validate", cost=5)
def validate(w: Work) -> None:
    proc = w.run("bash run_learning.sh validate", w.od)
    assert re.search(r"validate: \d+ passed or warned, 0 failed", proc.stdout + proc.stderr)


@case("bash run_learning.sh selftest", cost=7)
def selftest(w: Work) -> None:
    # collected, not run: this test is part of the suite it would start
    proc = w.run("bash run_learning.sh selftest", "--collect-only -q -p no:cacheprovider")
    assert re.search(r"\d+(/\d+)? tests collected", proc.stdout), proc.stdout[-3000:]
    assert "tests/test_guide_commands.py::test_command[" in proc.stdout


@case("bash run_learning.sh info --preset 730m", cost=5)
def info(w: Work) -> None:
    proc = w.run("bash run_learning.sh info --preset 730m")
    counts = json.loads(proc.stdout)["trainable_parameters"]
    assert abs(counts["total"] - 730e6) < 7.3e6 and MODULES <= set(counts)


@case("python training/test_unified_training.py --quick", cost=6)
def component_test(w: Work) -> None:
    proc = w.run("python training/test_unified_training.py --quick")
    assert "all component checks passed" in proc.stdout and "[FAIL]" not in proc.stdout, proc.stdout


@case('python -c "import torch; torch.cuda.empty_cache()"', cost=3)
def empty_cache(w: Work) -> None:
    w.run('python -c "import torch; torch.cuda.empty_cache()"', activated=True)


PREDICT = "bash run_learning.sh predict --checkpoint training/checkpoints_final/crossover_final.pth"


@case(f'{PREDICT} "text"', shared=True, cost=4)
def predict_text(w: Work) -> None:
    predictions(w.run(f'{PREDICT} "text"', out=w.shared().out).stdout, 1)


@case(f'{PREDICT} "I lied to my friend and she found out."', shared=True, cost=4)
def predict_sentence(w: Work) -> None:
    (p,) = predictions(w.run(f'{PREDICT} "I lied to my friend and she found out."', out=w.shared().out).stdout, 1)
    assert p["text"] == "I lied to my friend and she found out."


@case(f'{PREDICT} "I lied to my friend."', shared=True, cost=4)
def predict_sentence_korean_guide(w: Work) -> None:
    predictions(w.run(f'{PREDICT} "I lied to my friend."', out=w.shared().out).stdout, 1)


TEXTS = "I lied to my friend and she found out.\nI returned the wallet I found.\n"


@case(f"{PREDICT} --file texts.txt", shared=True, cost=4)
def predict_file(w: Work) -> None:
    (w.files / "texts.txt").write_text(TEXTS)
    lines = predictions(w.run(f"{PREDICT} --file texts.txt", out=w.shared().out).stdout, 2)
    assert [p["text"] for p in lines] == TEXTS.splitlines()


@case(f"cat texts.txt | {PREDICT}", shared=True, cost=4)
def predict_stdin(w: Work) -> None:
    (w.files / "texts.txt").write_text(TEXTS)
    lines = predictions(w.run(f"cat texts.txt | {PREDICT}", out=w.shared().out).stdout, 2)
    assert [p["text"] for p in lines] == TEXTS.splitlines()


EVALUATE = ("bash run_learning.sh evaluate --checkpoint training/checkpoints_final/crossover_final.pth "
            "--data dilemmas:scruples_dilemmas_dev.jsonl.gz")


@case(EVALUATE, shared=True, cost=6)
def evaluate_dilemmas(w: Work) -> None:
    pair = {"id": "d1", "actions": [{"id": "a", "description": "lying to my friend"},
                                    {"id": "b", "description": "returning a lost wallet"}], "gold_label": 0}
    with gzip.open(w.files / "scruples_dilemmas_dev.jsonl.gz", "wt") as f:
        f.write(json.dumps(pair) + "\n")
    path = str(w.files / "scruples_dilemmas_dev.jsonl.gz")
    proc = w.run(EVALUATE, out=w.shared().out, replace={"dilemmas:scruples_dilemmas_dev.jsonl.gz": f"dilemmas:{path}"})
    got = json.loads(proc.stdout)
    assert got["kind"] == "dilemmas" and got["n"] == 1 and got["accuracy"] in (0.0, 0.5, 1.0)


@case("bash run_learning.sh crossover training", shared=True, cost=8)
def crossover(w: Work) -> None:
    run = w.shared_copy()
    before = set((run / "checkpoints_final").glob("crossover_report_*.json"))
    w.run("bash run_learning.sh crossover training", out=run)
    assert set((run / "checkpoints_final").glob("crossover_report_*.json")) - before  # a new report
    final_model(run)


def _plotted(proc: subprocess.CompletedProcess, png: Path) -> None:
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(doc["path"]) == png and doc["panels"] == 9 and png.stat().st_size > 10_000


@case("bash run_learning.sh plot training", shared=True, cost=5)
def plot(w: Work) -> None:
    run = w.shared_copy()
    png = run / "logs" / f"training_curves_{w.shared().run_id}.png"
    png.unlink()
    _plotted(w.run("bash run_learning.sh plot training", out=run), png)


@case("python training/plot_training_curves.py", shared=True, cost=5)
def plot_script(w: Work) -> None:
    run = w.shared_copy()
    png = run / "logs" / f"training_curves_{w.shared().run_id}.png"
    png.unlink()
    _plotted(w.run("python training/plot_training_curves.py", f"--output-dir {run}"), png)


@case("python -m redheart plot training --dpi 80 --out docs/images/training_curves.png", shared=True, cost=5)
def plot_module_dpi(w: Work) -> None:
    png = w.files / "training_curves.png"  # not the README's own picture
    proc = w.run("python -m redheart plot training --dpi 80 --out docs/images/training_curves.png", out=w.shared().out,
                 replace={"docs/images/training_curves.png": str(png)}, activated=True)
    _plotted(proc, png)


@case("ls -lah training/checkpoints_final/", shared=True, cost=1)
def list_checkpoints(w: Work) -> None:
    proc = w.run("ls -lah training/checkpoints_final/", out=w.shared().out)
    assert "crossover_final.pth" in proc.stdout and "checkpoint_epoch_0002_" in proc.stdout


@case("cat training/sweet_spot_analysis/sweet_spot_report_*.txt", shared=True, cost=1)
def sweet_spot_report(w: Work) -> None:
    proc = w.run("cat training/sweet_spot_analysis/sweet_spot_report_*.txt", out=w.shared().out)
    assert all(m in proc.stdout for m in MODULES), proc.stdout


# The commands not run, with the reason. A command added to a document must join CASES or this.
VENV = "rebuilds the environment the test suite runs in (and needs the package index)"
GPUS = "needs {} GPUs (tests/test_distributed.py runs the same launcher with CPU processes)"
SKIPPED = {
    "bash run_learning.sh unified-train --gpus 2": GPUS.format(2),
    "bash run_learning.sh unified-train --gpus 4": GPUS.format(4),
    "red_heart_env/bin/tensorboard --logdir training/logs":
        "a server that runs until stopped (the unified-test case checks the event files it reads)",
    "tail -f training.log": "follows the file for ever (the nohup unified-train case reads training.log)",
    "watch -n 1 nvidia-smi": "needs a GPU, and runs until stopped",
    "screen -S training": "an interactive terminal (the command run in it is the unified-train case)",
    'python -c "import torch; print(torch.cuda.memory_summary())"': "needs a GPU (KeyError without CUDA)",
    "rm -rf red_heart_env": VENV,
    "python3 -m venv red_heart_env": VENV,
    "source red_heart_env/bin/activate": VENV,
    "pip install -r requirements_venv.txt": VENV,
    "rm -rf red_heart_env && bash run_learning.sh validate": VENV,
}


# ---------------------------------------------------------------------------------------------
# the documents' Python snippets, against the shared run


def _snippet_code(code: str, shared: Shared) -> str:
    snap = next(e for e in snapshots(shared.out) if e["epoch"] == 2)["file"]
    code = re.sub(r"""(['"])training/""", lambda m: f"{m.group(1)}{shared.out}/", code)
    code = re.sub(r"checkpoint_epoch_\d+\.pt", snap, code)  # the guide's name has no LR and time stamp
    pre = post = ""
    if re.search(r"\bmodel\.", code) and not re.search(r"^\s*model\s*=", code, re.M):
        # the guide's `model` (the user's network): the model the run trained, rebuilt
        final = str(shared.out / "checkpoints_final" / "crossover_final.pth")
        pre = ("from redheart.ckpt.rebuild import model_from_checkpoint\n"
               f"model, _, _ = model_from_checkpoint({final!r})\n")
    if "load_state_dict(checkpoint['model_state'])" in code:
        post = ("\nimport torch as _t\n_s = model.state_dict()\n"
                "assert all(_t.equal(v, _s[k]) for k, v in checkpoint['model_state'].items())\n")
    if re.search(r"^model\s*=\s*torch\.load\(", code, re.M):  # the guide's: a dict, the weights in it
        post += "\nassert isinstance(model, dict) and model['model_state']\n"
    if re.search(r"^predictor\s*=", code, re.M):
        post += "\n_p = predictor('I lied to my friend.')\nassert {'emotion', 'bentham', 'regret', 'surd'} <= set(_p)\n"
    return pre + code + post


def _snippet_case(doc: str, index: int, code: str) -> None:
    def fn(w: Work) -> None:
        s = w.shared()
        path = w.files / "snippet.py"
        path.write_text(_snippet_code(code, s))
        proc = sh(f"python {path}", cwd=w.files, activated=True)
        assert proc.returncode == 0, f"{doc} snippet:\n{path.read_text()}\n--- stderr\n{proc.stderr[-3000:]}"
        if "metadata.json" in code:  # the guide's: every snapshot's epoch and loss
            shown = re.findall(r"^Epoch (\d+): Loss=\d+\.\d{4}$", proc.stdout, re.M)
            assert [int(x) for x in shown] == [1, 2], proc.stdout

    name = f"python_snippet_{doc.split('.')[0].lower()}_{index}"
    CASES[name] = Case(name, (), fn, shared=True, cost=4)


for _doc in DOCS:
    for _i, _code in enumerate(python_snippets(_doc_text(_doc) or ""), 1):
        _snippet_case(_doc, _i, _code)


# ---------------------------------------------------------------------------------------------
# the jobs: every selected case started at once, WORKERS at a time


class Jobs:
    def __init__(self, names: list[str], factory):
        self.factory, self.lock = factory, threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="guide-command")
        self.futures: dict[str, Future] = {}
        self._shared: Future | None = None
        if any(CASES[n].shared for n in names):
            self._start_shared()
        # the cases on their own first, the longest first; then those that read the shared run
        for n in sorted(names, key=lambda n: (CASES[n].shared, -CASES[n].cost)):
            self.start(n)

    def _start_shared(self) -> Future:
        with self.lock:
            if self._shared is None:
                self._shared = self.pool.submit(shared_run, Work(self.factory.mktemp("shared"), self))
            return self._shared

    def shared(self) -> Shared:
        try:
            return self._start_shared().result()
        except BaseException as exc:
            raise AssertionError(f"the shared `bash run_learning.sh unified-test` run failed: {exc}") from exc

    def start(self, name: str) -> Future:
        if CASES[name].shared:  # queued before the case that waits for it
            self._start_shared()
        with self.lock:
            if name not in self.futures:
                self.futures[name] = self.pool.submit(CASES[name].fn, Work(self.factory.mktemp(name), self))
            return self.futures[name]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def jobs(request, tmp_path_factory):
    this = sys.modules[__name__]
    params = [getattr(getattr(item, "callspec", None), "params", {}) for item in request.session.items
              if getattr(item, "module", None) is this]
    names = [p["name"] for p in params if "name" in p]  # the selected test_command cases
    jobs = Jobs(names, tmp_path_factory)
    yield jobs
    jobs.close()


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if c.slow else [])
                                  for n, c in CASES.items()])
def test_command(name, jobs):
    jobs.start(name).result()


@pytest.mark.parametrize("doc", list(DOCS))
def test_every_shown_command_is_covered(doc):
    """Every command the document shows is run by a case or skipped with a reason, and every
    command of the tables is still shown (the README and the guide together)."""
    text = _doc_text(doc)
    if text is None:
        pytest.skip(f"{DOCS[doc]} is not here")
    covered = {c for case in CASES.values() for c in case.shown}
    assert not covered & set(SKIPPED), "a command both run and skipped"
    shown = shown_commands(text)
    assert shown, f"no command found in {doc}"
    missing = sorted({c for c in shown if c not in covered and c not in SKIPPED})
    assert not missing, f"{doc} shows commands that no test runs and SKIPPED does not list: {missing}"
    if doc == "README.md" and GUIDE.is_file():
        everywhere = set(shown) | set(shown_commands(GUIDE.read_text(encoding="utf-8")))
        stale = sorted((covered | set(SKIPPED)) - everywhere)
        assert not stale, f"commands of this file's tables that neither document shows any more: {stale}"
