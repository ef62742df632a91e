"""The FLOPs behind samples/s, TFLOP/s and MFU: the count of `redheart.train.flops` against
torch.utils.flop_counter on a real training step of the tiny preset (matrix products and
attention, forward and backward, R-Drop's two passes), with every head trained and with a
head that has no targets (the public corpus's SURD), whose tower runs no backward."""
from __future__ import annotations

from collections import Counter

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
    trainer.zero_grad()
    return counter.get_total_flops()


@pytest.mark.parametrize("without", [None, "surd", "emotion"])
def test_the_count_is_the_work_that_runs(trainer, without):
    from redheart.train.flops import train_flops

    data = trainer.train_data
    step = _equal_length_step(trainer)
    saved = getattr(data, f"{without}_mask").clone() if without else None
    try:
        if without:
            getattr(data, f"{without}_mask")[:] = False  # as the public corpus has no SURD targets
        heads = [h for h, c in data.head_counts(step).items() if c > 0]
        assert (without in heads) is False and len(heads) == (4 if without is None else 3)
        measured = _measured(trainer, step)
    finally:
        if without:
            getattr(data, f"{without}_mask").copy_(saved)
    lengths = data.lengths[step].tolist()
    rdrop = trainer.cfg.tech.rdrop_alpha > 0
    assert rdrop  # the tiny preset trains with R-Drop: both passes are in the measurement
    counted = train_flops(trainer.cfg.model, lengths, rdrop, encoder_runs=False, heads=heads)
    assert abs(counted - measured) / measured < 0.01, (counted, measured)
    if without is not None:  # counting the idle tower's backward would overstate the work
        every_head = train_flops(trainer.cfg.model, lengths, rdrop, encoder_runs=False)
        assert every_head / measured > 1.05
