"""Epoch-end resume states written from a thread (`train.async_save`): training goes on while
the state is written, and every state equals, bit for bit, the one a synchronous run writes."""
from __future__ import annotations

import threading
import time

import torch

from helpers import run, tiny_config
from redheart.ckpt import io as ckio
from redheart.ckpt.state import read_registry


TIMING = {"timestamp", "memory", "seconds", "samples_per_s", "tokens_per_s", "tflops", "mfu", "train_seconds", "elapsed_s"}


def _states(root) -> dict[int, dict]:
    return {e["global_step"]: ckio.load(e["path"], e["sha256"]) for e in read_registry(root)}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_background_writes_overlap_training_and_equal_the_synchronous_states(tmp_path):
    common = {"train.epochs": 2, "data.max_records": 80, "train.resume_states_kept": 10,
              "crossover.enabled": False}
    assert run(tiny_config(tmp_path / "sync", **common, **{"train.async_save": "off"}), analysis=False) == 0
    # A resume state's write stops half-way until a file appears, and a watcher makes that file
    # once epoch 2's summary is in the log: the run ends only if epoch 2 trains during epoch 1's
    # write (written from the main thread, the write would wait out its 120 s and the order of
    # the log lines below would say so). No fixed pause: as fast on a loaded machine as on an idle one.
    release, done = tmp_path / "release", threading.Event()

    def watch() -> None:
        while not done.is_set():
            logs = list((tmp_path / "async" / "logs").glob("training_*.log"))
            if logs and "epoch 2/2: train loss" in logs[0].read_text():
                release.touch()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert run(tiny_config(tmp_path / "async", **common, **{"train.async_save": "on"}), analysis=False,
                   faults={"write_wait_for": {"match": "resume_state_", "path": str(release)}}) == 0
    finally:
        done.set()
    log = next((tmp_path / "async" / "logs").glob("training_*.log")).read_text()
    sync, bg = _states(tmp_path / "sync"), _states(tmp_path / "async")
    assert sorted(sync) == sorted(bg) and len(bg) == 2
    first = min(bg)
    written = log.index("resume state written in the background: resume_state_")
    assert f"_step{first:08d}.pt" in log[written:written + 120]
    assert log.index("epoch 2/2: train loss") < written  # epoch 2 finished while epoch 1's state was written
    for step in sync:
        a, b = dict(sync[step]), dict(bg[step])
        assert a.keys() == b.keys()
        for k in a:
            if k == "history":  # the same records, but for wall-clock figures
                for ra, rb in zip(a[k], b[k]):
                    diff = {f for f in ra if not _equal(ra[f], rb[f])}
                    assert diff <= TIMING, diff
            elif k not in ("run_id", "config", "epoch_elapsed_s"):
                assert _equal(a[k], b[k]), (step, k)
