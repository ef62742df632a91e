"""Shared helpers of the test suite: tiny configs, in-process runs, paths."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from redheart.ckpt import io as ckio
from redheart.ckpt.state import read_registry
from redheart.config import Config, preset

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "redheart" / "sample_data" / "sample_en.jsonl"


def tiny_config(out: Path, **sections) -> Config:
    """The tiny preset writing under `out`; `sections` maps "train.epochs" style keys to values."""
    from redheart.config import set_value

    cfg = preset("tiny")
    cfg.output_dir = str(out)
    cfg.train.log_every = 1000
    for key, value in sections.items():
        set_value(cfg, key.replace("__", "."), value)
    return cfg.validate()


def run(cfg: Config, **opts) -> int:
    from redheart.run import RunOptions, train

    return train(cfg, RunOptions(**opts))


def read_log(out: Path) -> str:
    """The training log(s) of the run under `out`, in order."""
    return "".join(p.read_text() for p in sorted((out / "logs").glob("training_*.log")))


def newest_state(root: Path) -> dict:
    entries = read_registry(Path(root))
    assert entries, f"no resume state under {root}"
    return ckio.load(entries[-1]["path"], entries[-1]["sha256"])


def straight_and_resumed(root: Path, **sections) -> tuple[dict, dict]:
    """The final states of a run straight through (`root/a`) and of the same run stopped in its
    middle step and resumed (`root/b`), for an exact-resume comparison."""
    assert run(tiny_config(root / "a", **sections), analysis=False) == 0
    straight = newest_state(root / "a")
    stop_at = straight["global_step"] // 2 + 1
    assert run(tiny_config(root / "b", **sections), analysis=False, faults={"stop_at_step": stop_at}) == 75
    assert newest_state(root / "b")["global_step"] == stop_at
    assert run(tiny_config(root / "b", **sections), resume="latest", analysis=False) == 0
    resumed = newest_state(root / "b")
    assert resumed["global_step"] == straight["global_step"] > stop_at
    return straight, resumed


def same_tensors(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (bit for bit)."""
    assert set(a) == set(b), set(a) ^ set(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc): torchrun starts its ranks in sessions of their own."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m redheart ...` in a real process. On a timeout every process it started
    goes too (a launcher's torchrun and its ranks, not left running beside the next tests)."""
    import signal

    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("SAMPLES", None) if env is None or "SAMPLES" not in env else None
    cmd = [sys.executable, "-m", "redheart", *args]
    with subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [proc.pid, *_descendants(proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def mixed_lengths_data(write_file) -> str:
    """Texts of 4 to about 120 tokens, like the public corpus's comments beside its posts."""
    rng = random.Random(0)
    words = "I lent my car to a friend and he crashed it then said nothing for weeks".split()
    recs = []
    for i in range(80):
        n = rng.choice([rng.randint(3, 8), rng.randint(60, 110)])
        emo = [0.0] * 7
        emo[i % 7] = 1.0
        recs.append({"id": f"t{i}", "text": " ".join(rng.choice(words) for _ in range(n)), "emotion": emo,
                     "bentham": [rng.random() for _ in range(10)], "regret": rng.random(),
                     "surd": [0.25, 0.25, 0.25, 0.25]})
    return str(write_file("mixed.jsonl", recs))
