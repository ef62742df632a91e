"""Vote shares weighed by their votes (issue 25): the Scruples importer keeps the count, the
canonical schema carries it, and the regret and Bentham losses weigh each record by it."""
from __future__ import annotations

import json

import pytest
import torch

from redheart.data.importers import load_records
from redheart.data.schema import DataError
from redheart.data.dataset import vote_weights
from redheart.train.losses import task_loss


def test_the_scruples_importer_keeps_the_non_info_votes(write_file):
    path = write_file("anecdotes.jsonl", [
        {"id": "s1", "title": "t", "text": "x", "label_scores": {"AUTHOR": 1, "OTHER": 3, "EVERYBODY": 0, "NOBODY": 0, "INFO": 5}},
        {"id": "s2", "title": "t", "text": "y", "label_scores": {"AUTHOR": 6, "OTHER": 2, "EVERYBODY": 1, "NOBODY": 1, "INFO": 0}}])
    recs, _ = load_records([f"scruples:{path}"])
    assert [(r.votes, r.regret) for r in recs] == [(4, 0.25), (10, 0.7)]
    assert recs[0].to_json()["votes"] == 4


def test_canonical_records_carry_votes_and_refuse_bad_ones(write_file):
    good = {"id": "a", "text": "I kept the money.", "regret": 0.4, "votes": 12}
    recs, _ = load_records([str(write_file("c.jsonl", [good, {**good, "id": "b", "votes": None}]))])
    assert [r.votes for r in recs] == [12, None]
    for bad in (0, -3, 2.5, True, "7"):
        with pytest.raises(DataError, match=r"d.jsonl:1: votes: expected a whole number of votes >= 1"):
            load_records([str(write_file("d.jsonl", [{**good, "votes": bad}]))])


def test_vote_weights_by_hand():
    w = vote_weights(torch.tensor([0.0, 1.0, 4.0, 0.0]), 0.5)
    info = [1 / (1 + 0 * 0.5), 4 / (1 + 3 * 0.5)]  # 1.0 and 1.6, mean 1.3
    assert w.tolist() == pytest.approx([1.0, info[0] / 1.3, info[1] / 1.3, 1.0])
    assert vote_weights(torch.tensor([2.0, 9.0, 40.0]), 1.0).tolist() == pytest.approx([1, 1, 1])  # rho 1: alike
    assert vote_weights(torch.zeros(3), 0.1).tolist() == [1, 1, 1]  # no vote shares: nothing changes
    many = vote_weights(torch.tensor([2.0, 7.0, 40.0, 1000.0]), 0.1)
    assert float(many.mean()) == pytest.approx(1.0) and many[0] < many[1] < many[2] < many[3] < 11 * many[0]


def test_the_weight_multiplies_each_records_regret_and_bentham_loss_only():
    g = torch.Generator().manual_seed(0)
    out = {h: torch.randn(3, *s, generator=g) for h, s in (("emotion", (7,)), ("bentham", (10,)), ("regret", ()),
                                                            ("surd", (4,)))}
    tgt = {"emotion": torch.softmax(torch.randn(3, 7, generator=g), -1), "emotion_mask": torch.ones(3, dtype=torch.bool),
           "bentham": torch.rand(3, 10, generator=g), "bentham_mask": torch.ones(3, 10, dtype=torch.bool),
           "regret": torch.rand(3, generator=g), "regret_mask": torch.ones(3, dtype=torch.bool),
           "surd": torch.softmax(torch.randn(3, 4, generator=g), -1), "surd_mask": torch.ones(3, dtype=torch.bool)}
    counts = {"emotion": 3, "bentham": 30, "regret": 3, "surd": 3}
    w = {h: 1.0 for h in counts}
    _, plain = task_loss(out, tgt, counts, w)
    _, weighed = task_loss(out, {**tgt, "weight": torch.tensor([0.5, 1.0, 2.0])}, counts, w)
    _, ones = task_loss(out, {**tgt, "weight": torch.ones(3)}, counts, w)
    for h in ("emotion", "surd"):
        assert weighed[h].item() == plain[h].item()
    assert {h: v.item() for h, v in ones.items()} == {h: v.item() for h, v in plain.items()}
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out["regret"], tgt["regret"], reduction="none")
    assert weighed["regret"].item() == pytest.approx(float((bce * torch.tensor([0.5, 1.0, 2.0])).sum() / 3), rel=1e-6)


def test_a_run_weighs_the_scruples_records_by_their_votes(tmp_path, write_file):
    from redheart.session import build_session

    from helpers import tiny_config

    rows = [{"id": f"s{i}", "title": "t", "text": f"story number {i}",
             "label_scores": {"AUTHOR": i % 5, "OTHER": 1 + i % 3, "EVERYBODY": 0, "NOBODY": i % 7, "INFO": 0}}
            for i in range(80)]
    path = write_file("anecdotes.jsonl", rows)
    for on in (True, False):
        cfg = tiny_config(tmp_path, tech__vote_weighting=on)
        cfg.data.paths = [f"scruples:{path}"]
        train = build_session(cfg.validate()).data.splits["train"]
        want = vote_weights(train.votes, cfg.tech.vote_overdispersion) if on else torch.ones(len(train))
        assert torch.equal(train.targets(torch.arange(len(train)))["weight"], want)
        assert (train.votes >= 1).all() and (len(set(want.tolist())) > 3) == on
