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
from redheart.train.trainer import build_optimizer

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
