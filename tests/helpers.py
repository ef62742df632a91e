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


def same_tensors(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (bit for bit)."""
    assert set(a) == set(b), set(a) ^ set(b)
    return [k for k in a if not torch.equal(a[k], b[k])]


def cli(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m redheart ...` in a real process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("SAMPLES", None) if env is None or "SAMPLES" not in env else None
    return subprocess.run([sys.executable, "-m", "redheart", *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


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
