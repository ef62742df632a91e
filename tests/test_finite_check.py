"""The step's finite check left on the device (`train.finite_check=deferred`, the default on a
GPU): AdamW skips a bad step there, the host reads the check while the next step's work is
queued, and everything ends as with the synchronous check, bit for bit, bad steps included.
On the CPU `auto` is synchronous, so these tests ask for `deferred` by name."""
from __future__ import annotations

import torch

from helpers import newest_state, read_log, run, same_tensors, tiny_config

COMMON = dict(data__max_records=60, train__epochs=2, train__grad_accum=4, train__device="cpu",
              train__log_every=1000, crossover__enabled=False)


def _same_states(a: dict, b: dict) -> None:
    assert same_tensors(a["model_state"], b["model_state"]) == []
    assert same_tensors(a["ema"]["shadow"], b["ema"]["shadow"]) == []
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"]
    for k in a["optimizer"]["state"]:
        assert same_tensors(a["optimizer"]["state"][k], b["optimizer"]["state"][k]) == []
    assert a["scheduler"] == b["scheduler"]
    assert (a["global_step"], a["bad_steps_total"], a["bad_steps_in_row"]) == \
        (b["global_step"], b["bad_steps_total"], b["bad_steps_in_row"])
    for x, y in zip(a["history"], b["history"], strict=True):
        keys = ("train", "val", "bad_steps", "lr_steps")
        assert [x[k] for k in keys] == [y[k] for k in keys]


def test_deferred_checks_end_where_synchronous_ones_do_with_bad_steps_skipped(tmp_path):
    faults = {"nan_at_steps": [3], "inf_grad_at_steps": [8]}
    states = {}
    for mode in ("sync", "deferred"):
        out = tmp_path / mode
        assert run(tiny_config(out, **COMMON, train__finite_check=mode), analysis=False, faults=faults) == 0
        states[mode] = newest_state(out)
        log = read_log(out)
        assert "step 3: non-finite loss or gradient, update skipped (1 in a row, 1 in all)" in log
        assert "step 8: non-finite loss or gradient, update skipped (1 in a row, 2 in all)" in log
    _same_states(states["deferred"], states["sync"])
    s = states["deferred"]
    assert s["ema"]["num_updates"] == s["scheduler"]["last_epoch"] == s["global_step"] - 2 == 10


def test_deferred_checks_stop_after_bad_steps_in_a_row_at_the_same_step(tmp_path):
    """Three NaN losses in a row with train.max_bad_steps=3: exit 5 after the third, as with the
    synchronous check (the run does not take one more step before it knows)."""
    kept = {}
    for mode in ("sync", "deferred"):
        out = tmp_path / mode
        cfg = tiny_config(out, **COMMON, train__finite_check=mode, train__max_bad_steps=3)
        assert run(cfg, analysis=False, faults={"nan_at_steps": [6, 7, 8]}) == 5
        kept[mode] = newest_state(out)
    assert kept["deferred"]["global_step"] == 9 and kept["deferred"]["bad_steps_in_row"] == 3
    _same_states(kept["deferred"], kept["sync"])


def _trainer(tmp_path, mode: str):
    from redheart.ckpt.state import RunPaths
    from redheart.session import build_session
    from redheart.train.trainer import Trainer

    cfg = tiny_config(tmp_path / mode, **COMMON, train__finite_check=mode)
    session = build_session(cfg)
    trainer = Trainer(cfg, RunPaths(tmp_path / mode, "check"), session.data, session.features, session.device)
    steps = [list(range(i * 8, i * 8 + 8)) for i in range(3)]
    return trainer, steps


def test_a_deferred_step_finishes_at_settle_and_a_bad_one_is_skipped_on_the_device(tmp_path):
    trainer, steps = _trainer(tmp_path, "deferred")
    assert trainer.update.defers_checks()
    assert trainer.optimizer_step(trainer.accumulate(steps[0])) is None  # the check is still on the device
    assert trainer.scheduler.last_epoch == 0 and trainer.ema.num_updates == 0  # schedule and EMA wait
    assert trainer.settle() is True and trainer.settle() is None
    assert trainer.scheduler.last_epoch == 1 and trainer.ema.num_updates == 1 and trainer.epoch_stats.steps == 1

    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    moments = {k: {n: t.clone() for n, t in v.items()} for k, v in trainer.optimizer.state.items()}
    parts = trainer.accumulate(steps[1])
    parts["loss"] = parts["loss"] * float("nan")
    assert trainer.optimizer_step(parts) is None
    # before the host knows: the update was already skipped (fused AdamW's found_inf)
    assert same_tensors(weights, {n: p.detach() for n, p in trainer.model.named_parameters()}) == []
    for k, v in trainer.optimizer.state.items():
        assert same_tensors(moments[k], v) == []
    # the next step settles it, before its own update
    assert trainer.optimizer_step(trainer.accumulate(steps[2])) is None
    assert trainer.update.bad_steps_total == 1 and trainer.update.bad_steps_in_row == 1 and trainer.scheduler.last_epoch == 1
    assert trainer.settle() is True and trainer.update.bad_steps_in_row == 0 and trainer.scheduler.last_epoch == 2
    assert any(not torch.equal(weights[n], p) for n, p in trainer.model.named_parameters())


def test_the_synchronous_check_decides_inside_the_step(tmp_path):
    trainer, steps = _trainer(tmp_path, "sync")
    assert not trainer.update.defers_checks()
    assert trainer.optimizer_step(trainer.accumulate(steps[0])) is True
    assert trainer.scheduler.last_epoch == 1 and trainer.settle() is None


def test_the_clip_handed_to_fused_adamw_is_clip_grad_norm(tmp_path):
    """With a fused AdamW the clipping coefficient goes into the update (`grad_scale`) instead of a
    pass over the gradients: two steps (unclipped, then clipped) end where clip_grad_norm_ and the
    unfused AdamW end, and the clip really bit (without it the second step lands far from both).
    Adam's first step does not depend on the gradients' scale, hence the unclipped first step."""
    import copy

    trainer, steps = _trainer(tmp_path, "sync")
    assert all(g.get("fused") for g in trainer.optimizer.param_groups)
    before = copy.deepcopy(trainer.model)
    grads, clips = [], (0.0, 0.01)  # clip_norm 0: no clipping
    for step, clip in zip(steps, clips):
        trainer.cfg.train.clip_norm = clip
        parts = trainer.accumulate(step)
        assert not [h for h, c in trainer.step_counts.items() if c == 0]  # every head takes part
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        assert trainer.apply_update(trainer.optimizer, parts) is True
        assert getattr(trainer.optimizer, "grad_scale", None) is None  # not left for another step
    assert float(parts["grad_norm"]) > 10 * clips[1]  # the second step's gradients scaled down over 10x

    def reference(clip: float) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(before)
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        mine = dict(model.named_parameters())
        opt = torch.optim.AdamW([{**{k: v for k, v in g.items() if k not in ("params", "fused")},
                                  "params": [mine[names[id(p)]] for p in g["params"]]}
                                 for g in trainer.optimizer.param_groups], foreach=False)
        for g, c in zip(grads, (float("inf"), clip)):
            for n, p in mine.items():
                p.grad = g[n].clone() if n in g else None
            torch.nn.utils.clip_grad_norm_([p for p in mine.values() if p.grad is not None], c)
            opt.step()
        return {n: p.detach() for n, p in mine.items()}

    def gap(ref: dict[str, torch.Tensor]) -> float:
        return max(float((p.detach() - ref[n]).abs().max()) for n, p in trainer.model.named_parameters())

    lr = trainer.optimizer.param_groups[0]["lr"]
    assert gap(reference(clips[1])) < 1e-3 * lr  # AdamW moves a weight by about lr a step: this is rounding
    assert gap(reference(float("inf"))) > 0.1 * lr  # not clipped: the second step goes elsewhere


def test_a_rank_that_defers_its_checks_does_not_turn_the_swap_manager_on_alone(tmp_path):
    """Out of memory with nothing smaller to try: one process turns the Dynamic Swap Manager on,
    but one rank of several that defer their checks stops instead (exit 4, resume with the swap
    on): the swap manager's update needs the synchronous check, so that rank would read its steps,
    and the others' stop requests, a step before the other ranks and leave them waiting. With
    synchronous checks the rank may turn it on alone, as before. (The rank is taken to be on a
    GPU: the swap manager needs one; nothing here runs on it.)"""
    from redheart.train.oom import oom_action

    for mode in ("deferred", "sync"):
        trainer, _ = _trainer(tmp_path, mode)
        defers = trainer.update.defers_checks()
        assert defers == (mode == "deferred")
        memory = trainer.cfg.memory
        assert oom_action(2, 1, memory, False, True, False, False) == ("retry", "")
        assert oom_action(1, 1, memory, False, True, False, False) == ("swap", "")  # one process
        action, why = oom_action(1, 1, memory, False, True, False, ranks_defer=defers)  # one rank of two
        if mode == "deferred":
            assert action == "stop" and "cannot turn the swap manager on alone" in why
        else:
            assert (action, why) == ("swap", "")
        memory.swap = "off"
        assert oom_action(1, 1, memory, False, True, False, defers) == ("stop", "nothing smaller fits")
