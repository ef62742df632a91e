"""The network trains: masks gate gradients, every parameter learns, a planted signal is learned."""
import json
import random

import torch

from redheart.config import preset
from redheart.model.network import RedHeartNet
from redheart.train.losses import task_loss

from helpers import newest_state, run, tiny_config


def _targets(b, **masks):
    t = {"emotion": torch.softmax(torch.randn(b, 7), -1), "bentham": torch.rand(b, 10),
         "regret": torch.rand(b), "surd": torch.softmax(torch.randn(b, 4), -1)}
    t["emotion_mask"] = masks.get("emotion", torch.ones(b, dtype=torch.bool))
    t["bentham_mask"] = masks.get("bentham", torch.ones(b, 10, dtype=torch.bool))
    t["regret_mask"] = masks.get("regret", torch.ones(b, dtype=torch.bool))
    t["surd_mask"] = masks.get("surd", torch.ones(b, dtype=torch.bool))
    return t


def _counts(t):
    return {h: int(t[f"{h}_mask"].sum()) for h in ("emotion", "bentham", "regret", "surd")}


def test_a_head_without_targets_gets_no_loss_and_no_gradient():
    torch.manual_seed(0)
    net = RedHeartNet(preset("tiny").model)
    x, keep = torch.randn(4, 8, 384), torch.ones(4, 8, dtype=torch.bool)
    t = _targets(4, surd=torch.zeros(4, dtype=torch.bool))
    loss, parts = task_loss(net(x, keep), t, _counts(t), preset("tiny").train.head_weights)
    assert "surd" not in parts
    loss.backward()
    surd_grads = [p.grad for n, p in net.named_parameters() if n.startswith("surd.")]
    assert all(g is None or float(g.abs().sum()) == 0.0 for g in surd_grads)
    others = [p.grad for n, p in net.named_parameters() if n.startswith(("emotion.", "backbone."))]
    assert all(g is not None and float(g.abs().sum()) > 0 for g in others)


def test_masked_bentham_elements_do_not_pull_their_outputs():
    torch.manual_seed(0)
    net = RedHeartNet(preset("tiny").model)
    x, keep = torch.randn(2, 5, 384), torch.ones(2, 5, dtype=torch.bool)
    bmask = torch.zeros(2, 10, dtype=torch.bool)
    bmask[:, 2] = True  # only certainty labelled, as in Scruples
    t = _targets(2, bentham=bmask)
    out = net(x, keep)
    out["bentham"].retain_grad()
    loss, _ = task_loss(out, t, _counts(t), preset("tiny").train.head_weights)
    loss.backward()
    g = out["bentham"].grad
    assert float(g[:, 2].abs().sum()) > 0
    assert float(g[:, [0, 1, 3, 4, 5, 6, 7, 8, 9]].abs().sum()) == 0.0


def test_every_parameter_receives_a_gradient_in_a_full_step():
    torch.manual_seed(0)
    net = RedHeartNet(preset("tiny").model)
    x, keep = torch.randn(3, 7, 384), torch.ones(3, 7, dtype=torch.bool)
    keep[0, 4:] = False
    t = _targets(3)
    loss, _ = task_loss(net(x, keep, True), t, _counts(t), preset("tiny").train.head_weights)
    loss.backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or float(p.grad.abs().sum()) == 0]
    assert dead == []


PLANTED = {  # a word in the text decides every target
    "sunflower": (0, 0.9, 0.05, 1), "thunder": (2, 0.1, 0.9, 3), "funeral": (4, 0.3, 0.6, 2),
    "garbage": (5, 0.5, 0.3, 0),
}
FILLERS = ["Yesterday I walked past the", "My neighbour talked about the", "We all noticed the",
           "Someone mentioned the", "On the way home there was the", "I keep thinking of the"]
ENDINGS = ["near the station.", "after lunch.", "in the old town.", "at the weekend.", "by the river."]


def planted_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        word = rng.choice(list(PLANTED))
        emo, util, regret, surd = PLANTED[word]
        e = [0.0] * 7
        e[emo] = 1.0
        s = [0.0] * 4
        s[surd] = 1.0
        b = [0.5] * 9 + [util]
        recs.append({"id": f"p{i}", "text": f"{rng.choice(FILLERS)} {word} {rng.choice(ENDINGS)}",
                     "emotion": e, "bentham": b, "regret": regret, "surd": s, "source": "planted"})
    return recs


def test_tiny_preset_learns_a_planted_pattern_well_above_chance(tmp_path):
    data = tmp_path / "planted.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in planted_records(320)))
    cfg = tiny_config(tmp_path / "out", data__paths=[str(data)], train__epochs=6, train__lr=3e-3,
                      train__grad_accum=4, tech__rdrop_alpha=0.0, crossover__enabled=False)
    assert run(cfg, analysis=False) == 0
    final = newest_state(tmp_path / "out")["history"][-1]["val"]
    assert final["emotion_acc"] >= 0.9, final  # chance: 1/4 of the planted classes, 1/7 overall
    assert final["regret_mae"] < 0.12, final
    assert final["regret_r"] > 0.9, final


def _step_grads(tech_changes: dict, seed: int = 0):
    """One forward_loss + backward of the real tiny network on the same inputs and dropout seed."""
    from dataclasses import replace

    from redheart.train.step import forward_loss

    cfg = preset("tiny")
    torch.manual_seed(0)
    net = RedHeartNet(cfg.model).train()
    with torch.no_grad():  # away from the initialisation, whose output layers start near zero
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    x, keep = torch.randn(4, 8, 384, generator=torch.Generator().manual_seed(1)), torch.ones(4, 8, dtype=torch.bool)
    t = _targets(4)
    torch.manual_seed(seed)
    loss, parts = forward_loss(net, x, keep, False, t, _counts(t), replace(cfg.tech, **tech_changes),
                               cfg.train.head_weights, None)
    loss.backward()
    return parts, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_rdrop_on_adds_a_consistency_term_and_changes_the_gradients():
    assert preset("tiny").model.dropout > 0  # R-Drop needs dropout to compare two passes
    on, g_on = _step_grads({"rdrop_alpha": 1.0})
    off, g_off = _step_grads({"rdrop_alpha": 0.0})
    assert float(on["rdrop"]) > 1e-6
    assert torch.allclose(on["loss"], on["task"] + on["rdrop"])
    assert "rdrop" not in off
    assert any(not torch.allclose(g_on[n], g_off[n]) for n in g_on)


def test_label_smoothing_changes_the_emotion_loss_of_the_real_network():
    on, _ = _step_grads({"label_smoothing": 0.1, "rdrop_alpha": 0.0})
    off, _ = _step_grads({"label_smoothing": 0.0, "rdrop_alpha": 0.0})
    assert abs(float(on["emotion"]) - float(off["emotion"])) > 1e-4
    assert float(on["bentham"]) == float(off["bentham"])  # regressions are not smoothed
