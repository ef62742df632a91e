"""The step benchmark's split runs: a curve stopped and continued in a second call equals the
uninterrupted curve (the memory issue's 100 capped steps span two device calls)."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from helpers import ROOT, SAMPLE, SHARED_DATA

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
    # 46 training texts in steps of 8: the sixth step is short, and the whole run says so
    doc = json.loads((tmp_path / "whole.json").read_text())
    assert doc["results"][0]["short_steps_timed"] == 1


def test_compare_curves_prints_per_range_and_window_differences(tmp_path, capsys):
    """The #5 yardstick table: differences computed against the second curve of each pair."""
    spec = importlib.util.spec_from_file_location("compare_curves", ROOT / "bench" / "compare_curves.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    path = tmp_path / "c.jsonl"
    ref = [2.0, 2.0, 1.0, 1.0]
    other = [2.0, 2.2, 1.0, 0.5]  # +10% at step 1, -50% at step 3
    path.write_text("".join(json.dumps({"variant": v, "step": i, "loss": x}) + "\n"
                            for v, xs in (("a", ref), ("b", other)) for i, x in enumerate(xs)))
    assert compare.main([str(path), "--pair", "b:a", "--ranges", "0,2,4", "--window", "2"]) == 0
    out = capsys.readouterr().out
    assert "| b vs a | 1.0e-01 / 5.0e-02 | 5.0e-01 / 2.5e-01 |" in out
    assert "| b vs a | +5.0e-02 | -2.5e-01 |" in out  # window means 2.1 vs 2.0, 0.75 vs 1.0
    try:
        compare.main([str(path), "--pair", "b:zz"])
    except SystemExit as exc:
        assert "no curve 'zz'" in str(exc)
    else:
        raise AssertionError("an unknown curve name must be an error")


def test_an_inductor_setting_holds_for_its_variant_only():
    import torch._inductor.config as ic

    before = ic.fallback_random
    previous = bench_train.set_inductor({"fallback_random": json.dumps(not before)})
    assert ic.fallback_random is (not before) and previous == {"fallback_random": before}
    bench_train.set_inductor(previous)
    assert ic.fallback_random is before


def test_min_tokens_trains_only_on_texts_that_long(tmp_path, capsys, monkeypatch):
    """`--min-tokens`: the fixed-length work of the plain reference; every timed text is that long."""
    out = _bench(tmp_path, capsys, monkeypatch, "long", "long:micro_batch=4,grad_accum=1,warmup=0,steps=3",
                 "--min-tokens", "45")
    assert "of at least 45 tokens used" in out
    r = json.loads((tmp_path / "long.json").read_text())["results"][0]
    assert r["tokens_per_s"] / r["samples_per_s"] >= 45  # mean tokens of the timed texts
    out = _bench(tmp_path, capsys, monkeypatch, "all", "all:micro_batch=4,grad_accum=1,warmup=0,steps=3")
    r_all = json.loads((tmp_path / "all.json").read_text())["results"][0]
    assert r_all["tokens_per_s"] / r_all["samples_per_s"] < 45  # most of the sample's texts are shorter (mean 41)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--preset", "tiny", "--data", str(SAMPLE), "--records", "60",
                                      "--variant", "x:micro_batch=4", "--min-tokens", "100000"])
    try:
        bench_train.main()
    except SystemExit as exc:
        assert "--min-tokens 100000: no training text is that long" in str(exc)
    else:
        raise AssertionError("a --min-tokens no text reaches must be an error")


def test_a_profiled_variant_prints_each_micro_batch_size(tmp_path, capsys, monkeypatch):
    """`--profile DIR`: one more step under the profiler, its summary in the results, and a line
    for each micro-batch size (texts, tokens) with what it took (on the CPU: host time only)."""
    out = _bench(tmp_path, capsys, monkeypatch, "prof", "prof:micro_batch=4,grad_accum=2,warmup=0,steps=2",
                 "--profile", str(tmp_path / "traces"))
    r = json.loads((tmp_path / "prof.json").read_text())["results"][0]
    assert sum(m["count"] for m in r["profile"]["micro_batches"]) == 2, r["profile"]["micro_batches"]
    lines = [line for line in out.splitlines() if line.startswith("prof:   micro-batch of ")]
    assert lines and all("texts, " in line and " tokens: x" in line and "no GPU" in line for line in lines), out


def _plain():
    spec = importlib.util.spec_from_file_location("bench_plain", ROOT / "bench" / "bench_plain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_plain_reference_is_the_trainer_network_in_size():
    """bench_plain.py compares with the trainer only if it is the same model: same parameter count,
    same number of Transformer layers and heads (counted on the meta device: no memory)."""
    import torch

    from redheart.config import preset
    from redheart.model.network import Block, RedHeartNet

    plain = _plain()
    for name in ("tiny", "730m"):
        cfg = preset(name).model
        with torch.device("meta"):
            ours, ref = RedHeartNet(cfg), plain.PlainNet(cfg)
        assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in ours.parameters())
        layers = [m for m in ref.modules() if isinstance(m, torch.nn.TransformerEncoderLayer)]
        assert len(layers) == sum(isinstance(m, Block) for m in ours.modules()) == cfg.layers + 4 * cfg.tower_layers
        assert {m.self_attn.num_heads for m in layers} == {cfg.heads}


def test_the_plain_reference_trains(tmp_path, capsys, monkeypatch):
    """A CPU run of bench_plain.py: figures for each variant, accumulation included, and a falling loss."""
    out = tmp_path / "plain.json"
    monkeypatch.setattr(sys, "argv", ["bench_plain.py", "--preset", "tiny", "--tokens", "64", "--warmup", "2",
                                      "--steps", "8", "--variant", "one:micro_batch=4",
                                      "--variant", "acc:micro_batch=2,grad_accum=2,warmup=1,steps=9", "--out", str(out)])
    assert _plain().main() == 0
    assert "| one |" in capsys.readouterr().out
    one, acc = json.loads(out.read_text())["results"]
    assert (one["micro_batch"], one["grad_accum"], acc["micro_batch"], acc["grad_accum"]) == (4, 1, 2, 2)
    for r in (one, acc):
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] == r["samples_per_s"] * 64
        assert len(r["losses"]) == 10 and r["losses"][-1] < r["losses"][0]
        assert abs(r["step_s"] * r["samples_per_s"] - 4) < 1e-6  # 4 samples an optimizer step


@pytest.mark.parametrize("corpus", ["sample", "public"])
def test_the_shares_benchmark_finds_the_dealt_shares_lighter_than_snake_order(capsys, monkeypatch, corpus):
    """`bench/bench_shares.py` (the 730m preset's configuration, texts tokenised only): a row per
    GPU count and dealing; the trainer's shares never leave the slowest rank more work than texts
    in snake order, nor more work in all. On the public corpus's mix of long Scruples texts and
    short GoEmotions ones, less."""
    data = [str(SAMPLE)]
    if corpus == "public":
        files = [SHARED_DATA / "scruples_anecdotes.jsonl.gz", SHARED_DATA / "goemotions_en_train.tsv.gz"]
        if not all(f.is_file() for f in files):
            pytest.skip(f"the public corpus is not beside the repository ({SHARED_DATA})")
        data = [f"scruples:{files[0]}", f"goemotions:{files[1]}"]
    spec = importlib.util.spec_from_file_location("bench_shares", ROOT / "bench" / "bench_shares.py")
    bench_shares = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_shares)
    monkeypatch.setattr(sys, "argv", ["bench_shares.py", "--gpus", "2", "4", "--records", "6400",
                                      *[a for d in data for a in ("--data", d)]])
    bench_shares.main()
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = line.split()
        if len(cells) == 5 and cells[0].isdigit():
            rows[int(cells[0]), cells[1]] = (int(cells[2].replace(",", "")), int(cells[4].replace(",", "")))
    assert set(rows) == {(2, "snake"), (2, "dealt"), (4, "snake"), (4, "dealt")}
    for world in (2, 4):
        assert rows[world, "dealt"][0] <= rows[world, "snake"][0], rows
        assert rows[world, "dealt"][1] <= rows[world, "snake"][1], rows
        if corpus == "public":
            assert rows[world, "dealt"][0] < 0.98 * rows[world, "snake"][0], rows
