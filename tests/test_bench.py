"""The step benchmark's split runs: a curve stopped and continued in a second call equals the
uninterrupted curve (the memory issue's 100 capped steps span two device calls)."""
from __future__ import annotations

import importlib.util
import json
import sys

from helpers import ROOT, SAMPLE

spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "bench_train.py")
bench_train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_train)


def _bench(tmp_path, capsys, monkeypatch, name: str, variant: str, *extra: str) -> str:
    """One call of the benchmark's command line (in this process: the same code path); its stdout."""
    out = tmp_path / f"{name}.json"
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--preset", "tiny", "--data", str(SAMPLE), "--records", "60",
                                      "--variant", variant, "--out", str(out), *extra])
    assert bench_train.main() == 0
    return capsys.readouterr().out


def test_a_curve_saved_and_continued_equals_the_uninterrupted_curve(tmp_path, capsys, monkeypatch):
    v = "curve:micro_batch=2,grad_accum=4,warmup=0,steps=6"
    _bench(tmp_path, capsys, monkeypatch, "whole", v, "--stream", str(tmp_path / "whole.jsonl"))
    state = tmp_path / "state"
    first = _bench(tmp_path, capsys, monkeypatch, "part1", v + ",save_at=3", "--state-dir", str(state),
                   "--stream", str(tmp_path / "split.jsonl"))
    assert "stopped after step 3 of 6" in first and (state / "curve.pt").exists()
    second = _bench(tmp_path, capsys, monkeypatch, "part2", v, "--state-dir", str(state),
                    "--stream", str(tmp_path / "split.jsonl"))
    assert "continuing from step 3" in second
    assert not (state / "curve.pt").exists()  # finished: the next call would start afresh

    def losses(name):
        return [json.loads(line)["loss"] for line in (tmp_path / name).read_text().splitlines()]

    whole, split = losses("whole.jsonl"), losses("split.jsonl")
    assert len(whole) == len(split) == 6
    assert whole == split  # bit for bit on the CPU: data order, dropout and AdamW state all continue
    assert len(set(whole)) > 1
    doc = json.loads((tmp_path / "part2.json").read_text())
    assert doc["results"][0]["losses"] == whole  # the second call reports the whole curve
