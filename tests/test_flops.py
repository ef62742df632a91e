"""The towers a training step runs, and the FLOPs behind samples/s, TFLOP/s and MFU.

A head without targets in the step (the public corpus never has SURD targets) contributes no
loss: its tower is left out of the step, which changes no loss and no gradient. The count of
`redheart.train.flops` is checked against torch.utils.flop_counter on a real training step of
the tiny preset (matrix products and attention, forward and backward, R-Drop's two passes)."""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import tiny_config


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from redheart.ckpt.state import RunPaths
    from redheart.session import build_session
    from redheart.train.trainer import Trainer

    out = tmp_path_factory.mktemp("flops")
    cfg = tiny_config(out, data__max_records=60, train__device="cpu", train__micro_batch=8, train__grad_accum=1,
                      train__packing="off")
    session = build_session(cfg)
    return Trainer(cfg, RunPaths(out, "flops"), session.data, session.features, session.device)


def _equal_length_step(trainer) -> list[int]:
    """Texts of one length: no padding, so the executed work is exactly the texts' work."""
    lengths = trainer.train_data.lengths.tolist()
    n, count = Counter(lengths).most_common(1)[0]
    assert count >= 4
    return [i for i, x in enumerate(lengths) if x == n][:8]


def _measured(trainer, step: list[int]) -> int:
    with FlopCounterMode(display=False) as counter:
        trainer.accumulate(step)
    trainer.update.zero_grad()
    return counter.get_total_flops()


@contextmanager
def _no_targets(data, head: str | None):
    """The step's data with `head`'s targets removed, as the public corpus has no SURD targets."""
    if head is None:
        yield
        return
    mask = getattr(data, f"{head}_mask")
    saved = mask.clone()
    mask[:] = False
    try:
        yield
    finally:
        mask.copy_(saved)


def test_a_head_without_targets_leaves_its_tower_out_and_changes_nothing(trainer):
    from redheart.train.step import forward_loss, towers_run

    step = _equal_length_step(trainer)
    data, src = trainer.train_data, trainer.features["train"]
    calls = Counter()
    hooks = [getattr(trainer.model, h).register_forward_hook(lambda m, i, o, h=h: calls.update([h]))
             for h in ("emotion", "surd")]
    try:
        with _no_targets(data, "surd"):
            counts = data.head_counts(step)
            assert towers_run(counts) == ["emotion", "bentham", "regret"]
            idx = torch.tensor(step)
            states, keep = src.gather(idx, int(data.lengths[step].max()))
            tgt = src.targets_of(idx)
            results = {}
            for name, heads in (("all", None), ("run", towers_run(counts))):
                torch.manual_seed(0)  # the same dropout masks for both
                trainer.update.zero_grad()
                loss, parts = forward_loss(trainer.model, states, keep, False, tgt, counts, trainer.cfg.tech,
                                           trainer.cfg.train.head_weights, None, heads=heads)
                loss.backward()
                grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
                results[name] = (loss.detach(), parts, grads)
    finally:
        for h in hooks:
            h.remove()
        trainer.update.zero_grad()
    assert calls == {"emotion": 2, "surd": 1}  # the second pass left the SURD tower out
    (loss_a, parts_a, grads_a), (loss_r, parts_r, grads_r) = results["all"], results["run"]
    assert torch.equal(loss_a, loss_r) and parts_a.keys() == parts_r.keys() and "surd" not in parts_r
    assert grads_a.keys() == grads_r.keys() and not any(n.startswith("surd.") for n in grads_r)
    assert all(torch.equal(grads_a[n], grads_r[n]) for n in grads_a)
    assert any(n.startswith("emotion.") for n in grads_r)  # the trained towers did get gradients


@pytest.mark.parametrize("without", [None, "surd", "emotion"])
def test_the_count_is_the_work_that_runs(trainer, without):
    from redheart.train.flops import train_flops
    from redheart.train.step import towers_run

    data = trainer.train_data
    step = _equal_length_step(trainer)
    with _no_targets(data, without):
        heads = towers_run(data.head_counts(step))
        assert without not in heads and len(heads) == (4 if without is None else 3)
        measured = _measured(trainer, step)
    lengths = data.lengths[step].tolist()
    rdrop = trainer.cfg.tech.rdrop_alpha > 0
    assert rdrop  # the tiny preset trains with R-Drop: both passes are in the measurement
    counted = train_flops(trainer.cfg.model, lengths, rdrop, encoder_runs=False, heads=heads)
    assert abs(counted - measured) / measured < 0.01, (counted, measured)
    if without is not None:  # counting the idle tower would overstate the work
        every_head = train_flops(trainer.cfg.model, lengths, rdrop, encoder_runs=False)
        assert every_head / measured > 1.05


def test_the_count_of_the_encoders_trained_top_layers_is_the_work_that_runs(tmp_path):
    """`model.encoder_trainable`: the encoder's top layers run in the network, forward and
    backward, on R-Drop's doubled batch (their shape is the frozen encoder's, so the same
    count serves the frozen layers)."""
    from redheart.ckpt.state import RunPaths
    from redheart.session import build_session
    from redheart.train.flops import train_flops
    from redheart.train.step import towers_run
    from redheart.train.trainer import Trainer

    cfg = tiny_config(tmp_path, data__max_records=60, train__device="cpu", train__micro_batch=8, train__grad_accum=1,
                      train__packing="off", model__encoder_trainable=2)
    session = build_session(cfg)
    trainer = Trainer(cfg, RunPaths(tmp_path, "flops"), session.data, session.features, session.device)
    step = _equal_length_step(trainer)
    heads = towers_run(trainer.train_data.head_counts(step))
    measured = _measured(trainer, step)
    lengths = trainer.train_data.lengths[step].tolist()
    counted = train_flops(cfg.model, lengths, True, encoder_runs=False, heads=heads)
    assert abs(counted - measured) / measured < 0.01, (counted, measured)
    cfg.model.encoder_trainable = 0
    assert train_flops(cfg.model, lengths, True, encoder_runs=False, heads=heads) < 0.95 * measured
