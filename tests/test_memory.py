"""Memory: OOM recovery keeps the effective batch and the numbers, retries are bounded and
recorded; the Dynamic Swap Manager computes exactly what the GPU optimizer computes."""
import copy
import json
from pathlib import Path

import pytest
import torch

import redheart.train.swap as swap
from redheart.config import preset
from redheart.model.modules import preset_parameter_counts
from redheart.model.network import RedHeartNet
from redheart.train.memory import estimate
from redheart.train.update import build_optimizer

from helpers import newest_state, run, same_tensors, straight_and_resumed, tiny_config

# No dropout and no R-Drop: a changed micro-batch then changes only the summation order.
EXACT = dict(data__max_records=60, train__epochs=1, train__grad_accum=8, model__dropout=0.0,
             tech__rdrop_alpha=0.0)


def test_injected_oom_retries_the_same_samples_with_half_the_micro_batch(tmp_path):
    assert run(tiny_config(tmp_path / "a", **EXACT), analysis=False, faults={"stop_at_step": 2}) == 75
    clean = newest_state(tmp_path / "a")
    faults = {"oom_at_step": 1, "stop_at_step": 2}  # the second optimizer step hits "CUDA out of memory"
    assert run(tiny_config(tmp_path / "b", **EXACT), analysis=False, faults=faults) == 75
    hit = newest_state(tmp_path / "b")
    assert hit["global_step"] == clean["global_step"] == 2
    assert hit["micro_batch"] == 1 and clean["micro_batch"] == 2
    for k, v in clean["model_state"].items():  # same samples, same normalisation: the same step
        assert torch.allclose(v, hit["model_state"][k], rtol=1e-5, atol=1e-7), k
    assert same_tensors(clean["model_state"], hit["model_state"])  # not trivially equal: the order changed
    stats = json.loads(next((tmp_path / "b" / "oom_stats").glob("oom_stats_*.json")).read_text())
    (event,) = stats["events"]
    assert event["step"] == 1 and event["micro_batch_before"] == 2 and event["micro_batch_after"] == 1
    assert "retry" in event["action"] and "rss_gib" in event["memory"]
    assert stats["effective_batch"] == 16 and stats["batch_size_history"][-1]["micro_batch"] == 1


def test_oom_retries_are_bounded_and_end_in_a_resumable_stop(tmp_path):
    cfg = tiny_config(tmp_path, **EXACT, memory__max_oom_retries=1)
    code = run(cfg, analysis=False, faults={"oom_at_step": 1, "oom_attempts": 100})
    assert code == 4
    state = newest_state(tmp_path)
    assert state["global_step"] == 1 and not state["finished"]
    actions = [e["action"] for e in state["oom_events"]]
    assert len(actions) == 2 and "retry" in actions[0] and actions[-1] == "stop"
    assert run(tiny_config(tmp_path, **EXACT), analysis=False, resume="latest") == 0  # nothing was lost


def test_swap_optimizer_equals_adamw_bit_for_bit(monkeypatch):
    monkeypatch.setattr(swap, "CHUNK_BYTES", 20_000)  # many chunks, so the chunked update is exercised
    cfg = preset("tiny")
    torch.manual_seed(0)
    a = RedHeartNet(cfg.model).eval()
    b = copy.deepcopy(a)
    oa = build_optimizer(a, cfg, 1e-3, torch.device("cpu"))
    ob = build_optimizer(b, cfg, 1e-3, torch.device("cpu"), swap=True)
    assert len(ob._chunks) > 5
    for step in range(3):
        x, keep = torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.bool)
        for model, opt in ((a, oa), (b, ob)):
            out = model(x, keep)
            sum(v.float().pow(2).mean() for v in out.values()).backward()
            if step == 1:  # a head without gradient in this step is left alone by both
                for n, p in model.named_parameters():
                    if n.startswith("surd."):
                        p.grad = None
            opt.step()
            opt.zero_grad()
    assert same_tensors(dict(a.named_parameters()), dict(b.named_parameters())) == []
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        assert torch.equal(sa["state"][k]["exp_avg_sq"], sb["state"][k]["exp_avg_sq"])
    again = build_optimizer(copy.deepcopy(b), cfg, 1e-3, torch.device("cpu"))
    again.load_state_dict(sb)  # the swap manager's state resumes in the plain optimizer


def test_training_with_the_swap_manager_equals_training_without(tmp_path):
    base = dict(data__max_records=60, train__epochs=1, train__grad_accum=4, tech__rdrop_alpha=0.0)
    assert run(tiny_config(tmp_path / "a", **base), analysis=False) == 0
    assert run(tiny_config(tmp_path / "b", memory__swap="on", **base), analysis=False) == 0
    a, b = newest_state(tmp_path / "a"), newest_state(tmp_path / "b")
    assert same_tensors(a["model_state"], b["model_state"]) == []
    assert same_tensors(a["ema"]["shadow"], b["ema"]["shadow"]) == []


def test_memory_estimate_of_the_730m_preset_explains_the_8_gib_problem():
    cfg = preset("730m")
    params = preset_parameter_counts(cfg)["total"]
    est = estimate(cfg, params)
    # weights + gradients + AdamW moments in fp32 are 16 bytes a parameter: ~10.9 GiB before activations
    assert est["weights_gib"] + est["gradients_gib"] + est["optimizer_gib"] == pytest.approx(16 * params / 2**30)
    assert est["total_gib"] > 8
    on_gpu_with_swap = est["weights_gib"] + est["gradients_gib"]
    assert on_gpu_with_swap < 6  # what stays on the GPU once the swap manager holds AdamW


def test_a_run_under_the_swap_manager_stops_and_resumes_exactly(tmp_path):
    """The swap manager's master weights live in CPU memory: a resume must refill them from
    the restored weights (else the first step after the resume writes the initial weights
    plus one update back into the model: the 730m curve on the H200 jumped back to its
    step-0 loss)."""
    straight, resumed = straight_and_resumed(tmp_path, data__max_records=60, train__epochs=2, train__grad_accum=4,
                                             tech__rdrop_alpha=0.0, memory__swap="on")
    assert same_tensors(straight["model_state"], resumed["model_state"]) == []
    assert same_tensors(straight["ema"]["shadow"], resumed["ema"]["shadow"]) == []


def test_the_lr_sweep_under_the_swap_manager_equals_the_sweep_without(tmp_path):
    """The sweep reuses the swap manager (emptied for each rate, master weights refilled):
    every rate's curve, the choice and the trained weights equal the run without it."""
    base = dict(data__max_records=60, train__epochs=1, train__grad_accum=4, tech__rdrop_alpha=0.0,
                sweep__enabled=True, sweep__points=3, sweep__steps=4, sweep__eval_every=2)
    for name, extra in (("a", {}), ("b", {"memory__swap": "on"})):
        assert run(tiny_config(tmp_path / name, **base, **extra), analysis=False) == 0
    a, b = newest_state(tmp_path / "a"), newest_state(tmp_path / "b")
    pa, pb = (json.loads(Path(s["sweep"]["json"]).read_text())["points"] for s in (a, b))
    curves = [p["curve"] for p in pa]
    assert curves == [p["curve"] for p in pb] and len(curves) == 3
    assert len({c[-1] for c in curves}) == 3  # three different runs
    assert a["sweep"]["lr"] == b["sweep"]["lr"]
    assert same_tensors(a["model_state"], b["model_state"]) == []
    # ... and it is the swap manager that runs each rate, emptied, from the model's weights
    from redheart.ckpt.state import RunPaths
    from redheart.session import build_session
    from redheart.sweep import _fresh_optimizer
    from redheart.train.trainer import Trainer

    cfg = tiny_config(tmp_path / "c", **base, memory__swap="on")
    session = build_session(cfg)
    trainer = Trainer(cfg, RunPaths(tmp_path / "c", "sweep"), session.data, session.features, session.device)
    trainer.optimizer.state[trainer.optimizer.cpu_params[0]]["step"] = torch.tensor(5.0)
    with torch.no_grad():
        next(trainer.model.parameters()).add_(1.0)
    opt = _fresh_optimizer(trainer, 3e-4)
    assert opt is trainer.optimizer and isinstance(opt, swap.SwapAdamW) and not opt.state
    assert all(g["lr"] == 3e-4 for g in opt.param_groups)
    assert torch.equal(opt.cpu_params[0], next(trainer.model.parameters()).detach())


# ---------------------------------------------------------------- the estimate and the swap decision

# a corpus like the public one: 48% long posts (256 tokens), 52% short comments (12-40 tokens)
CORPUS_LENGTHS = [256] * 480 + [12 + (i * 7) % 29 for i in range(520)]


def _cfg(micro_batch: int, accum: int, rdrop: float, compile_: bool = False, packing: str = "auto"):
    cfg = preset("730m")
    cfg.train.micro_batch, cfg.train.grad_accum, cfg.tech.rdrop_alpha = micro_batch, accum, rdrop
    cfg.train.compile, cfg.train.packing = compile_, packing
    return cfg.validate()


def test_heaviest_micro_batch_padded_packed_and_without_data():
    from redheart.train.memory import HEAVY_SIGMAS, heaviest_micro_batch

    assert heaviest_micro_batch(None, 64, 256, packed=True) == 64 * 256  # no data: every text max_tokens
    assert heaviest_micro_batch(CORPUS_LENGTHS, 64, 256, packed=False) == 64 * 256  # padded to the longest
    n = len(CORPUS_LENGTHS)
    mean = sum(CORPUS_LENGTHS) / n
    std = (sum((x - mean) ** 2 for x in CORPUS_LENGTHS) / n) ** 0.5
    heavy = 64 * mean + HEAVY_SIGMAS * std * 8
    assert heaviest_micro_batch(CORPUS_LENGTHS, 64, 256, packed=True) == -(-int(heavy) // 256) * 256
    assert heaviest_micro_batch([10] * 100, 64, 256, packed=True) == 640  # equal lengths: no spread
    assert heaviest_micro_batch([300, 20], 2, 256, packed=False) == 512  # truncated at max_tokens


def test_memory_estimate_pinned_for_the_issue_configurations():
    """The 730m preset's estimate at the configurations of issue 24 on a corpus-like profile
    (three towers with targets, no encoder cache): pinned, so that a change of the memory
    model shows here (and in bench/RESULTS.md, against the peaks measured on the GPU)."""
    params = preset_parameter_counts(preset("730m"))["total"]
    profile = {"lengths": CORPUS_LENGTHS, "heads": 3, "cache_bytes": 0}
    got = {name: round(estimate(cfg, params, **profile)["total_gib"], 2) for name, cfg in {
        "2x32": _cfg(2, 32, 1.0), "2x32 no R-Drop": _cfg(2, 32, 0.0),
        "8x8 compiled packed": _cfg(8, 8, 1.0, True, "on"), "8x8 compiled packed no R-Drop": _cfg(8, 8, 0.0, True, "on"),
        "64 compiled": _cfg(64, 1, 1.0, True), "64 compiled no R-Drop": _cfg(64, 1, 0.0, True)}.items()}
    assert got == PINNED_ESTIMATES
    # and what the parts say: R-Drop doubles the activations, the swap manager drops AdamW's moments
    on, off = (estimate(_cfg(64, 1, a, True), params, **profile) for a in (1.0, 0.0))
    assert on["activations_gib"] == pytest.approx(2 * off["activations_gib"])
    swapped = _cfg(64, 1, 1.0, True)
    swapped.memory.swap = "on"
    assert estimate(swapped, params, **profile)["optimizer_gib"] == 0 and on["optimizer_gib"] == pytest.approx(8 * params / 2**30)


# Peaks measured on the GPU (bench/RESULTS.md, "Memory estimate"), 730m preset at micro-batch
# 64, compiled and packed, R-Drop on: the full-corpus run (H100, 2026-12-08; three towers with
# targets, its heaviest micro-batch from bench/heaviest_seen.py) and the step bench on texts of
# 256 tokens each (H200, 2026-11-29; two towers with targets).
MEASURED_64_COMPILED = [{"tokens": 22784, "heads": 3, "peak_gib": 44.71},
                        {"tokens": 64 * 256 * 2, "heads": 2, "peak_gib": 64.7}]


@pytest.mark.parametrize("measured", MEASURED_64_COMPILED, ids=["corpus", "256-token texts"])
def test_the_estimate_is_within_15_percent_of_the_measured_peaks(measured):
    params = preset_parameter_counts(preset("730m"))["total"]
    m = measured
    est = estimate(_cfg(64, 1, 1.0, True), params, tokens=m["tokens"] // 2, heads=m["heads"])["total_gib"]
    assert abs(est / m["peak_gib"] - 1) <= 0.15, est


PINNED_ESTIMATES = {"2x32": 17.93, "2x32 no R-Drop": 16.96, "8x8 compiled packed": 20.91,
                    "8x8 compiled packed no R-Drop": 17.77, "64 compiled": 54.61, "64 compiled no R-Drop": 34.62}


@pytest.mark.parametrize("need_vs_line, peak_vs_line, measured, swap", [
    (0.5, None, False, False),  # far below the line: no measurement, no swap manager
    (1.5, None, False, True),  # far above: the swap manager without a measurement
    (1.05, 0.9, True, False),  # near the line (above it): measured, and it fits
    (0.95, 1.02, True, True),  # near the line (below it): measured above it
    (0.95, None, True, True),  # near the line: the measurement ran out of memory
])
def test_the_swap_manager_is_decided_by_a_measurement_where_the_estimate_is_near_the_line(
        monkeypatch, need_vs_line, peak_vs_line, measured, swap):
    import redheart.train.plan as plan

    cfg = _cfg(64, 1, 1.0, True)
    params = preset_parameter_counts(cfg)["total"]
    profile = {"lengths": CORPUS_LENGTHS, "heads": 3, "cache_bytes": 0}
    need = estimate(cfg, params, **profile)["total_gib"]
    line = need / need_vs_line
    monkeypatch.setattr(plan, "memory_cap_gib", lambda device: line / 0.9)
    calls = []

    def measure():
        calls.append(1)
        return None if peak_vs_line is None else peak_vs_line * line

    on, _, why = plan.plan_memory(cfg, torch.device("cpu"), params, profile=profile, measure=measure)
    assert (on, bool(calls)) == (swap, measured)
    if measured:
        assert "a forward and backward of the heaviest micro-batch" in why


def test_heaviest_texts_reach_the_token_count_with_the_fewest_long_texts():
    from redheart.train.plan import heaviest_texts

    lengths = [256, 256, 256, 10, 20, 30, 256, 15]
    pick = heaviest_texts(lengths, 4, 530)  # two long texts and the two shortest reach 530 (537)
    assert len(pick) == 4 and sum(lengths[i] for i in pick) >= 530
    assert sorted(lengths[i] for i in pick) == [10, 15, 256, 256]
    assert sorted(lengths[i] for i in heaviest_texts(lengths, 4, 10_000)) == [256] * 4  # as heavy as it gets
