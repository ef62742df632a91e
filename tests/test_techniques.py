"""Training techniques as pure functions: label smoothing, masked losses, R-Drop, EMA, the LR
schedule and the validation metrics."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from redheart.train.ema import EMA
from redheart.train.losses import (per_item_losses, rdrop_consistency, smooth, soft_cross_entropy,
                                   symmetric_kl, task_loss, value_loss)
from redheart.train.metrics import head_metrics, macro_f1, pearson
from redheart.train.schedule import lr_factor, warmup_cosine

HEAD_W = {"emotion": 1.0, "bentham": 1.0, "regret": 1.0, "surd": 1.0}


def log_softmax_py(logits: list[float]) -> list[float]:
    m = max(logits)
    z = math.log(sum(math.exp(x - m) for x in logits)) + m
    return [x - z for x in logits]


# ---------------------------------------------------------------- label smoothing


def test_label_smoothing_exact_amount_for_a_confident_correct_prediction():
    logits = [4.0, 0.5, -1.0, 0.0, -2.0]
    K, e, c = len(logits), 0.1, 0
    logp = log_softmax_py(logits)
    plain_hand = -logp[c]
    smoothed_hand = -(1 - e) * logp[c] - e / K * sum(logp)
    t_logits = torch.tensor([logits])
    target = torch.zeros(1, K)
    target[0, c] = 1.0
    plain = float(soft_cross_entropy(t_logits, target, 0.0)[0])
    smoothed = float(soft_cross_entropy(t_logits, target, e)[0])
    assert plain == pytest.approx(plain_hand, rel=1e-5)
    assert smoothed == pytest.approx(smoothed_hand, rel=1e-5)
    assert smoothed > plain
    assert smoothed - plain == pytest.approx(e * logp[c] - e / K * sum(logp), rel=1e-4)


def test_smooth_target():
    t = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    s = smooth(t, 0.2)
    assert torch.allclose(s, torch.tensor([[0.85, 0.05, 0.05, 0.05], [0.45, 0.45, 0.05, 0.05]]))
    assert torch.allclose(s.sum(-1), torch.ones(2))
    assert smooth(t, 0.0) is t


def test_cross_entropy_reads_logits_not_probabilities():
    # a confident logit: the loss is ~exp(-10)*2, not the ~0.55 one gets from softmax(softmax(x))
    loss = float(soft_cross_entropy(torch.tensor([[10.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]))[0])
    assert loss == pytest.approx(-log_softmax_py([10.0, 0.0, 0.0])[0], abs=1e-6)
    assert loss < 1e-3


def test_task_loss_applies_smoothing_to_emotion_and_surd_as_configured():
    out, tgt = batch(seed=1, requires_grad=False)
    counts = counts_of(tgt)
    _, plain = task_loss(out, tgt, counts, HEAD_W, smoothing=0.0)
    _, smoothed = task_loss(out, tgt, counts, HEAD_W, smoothing=0.1, smooth_surd=False)
    _, both = task_loss(out, tgt, counts, HEAD_W, smoothing=0.1, smooth_surd=True)
    assert smoothed["emotion"].item() != pytest.approx(plain["emotion"].item())
    assert smoothed["surd"].item() == pytest.approx(plain["surd"].item())
    assert both["surd"].item() != pytest.approx(plain["surd"].item())
    assert smoothed["bentham"].item() == pytest.approx(plain["bentham"].item())


# ---------------------------------------------------------------- masked soft targets / task_loss


def batch(seed: int = 0, b: int = 3, requires_grad: bool = True):
    g = torch.Generator().manual_seed(seed)
    out = {"emotion": torch.randn(b, 7, generator=g), "bentham": torch.randn(b, 10, generator=g),
           "regret": torch.randn(b, generator=g), "surd": torch.randn(b, 4, generator=g)}
    for t in out.values():
        t.requires_grad_(requires_grad)
    tgt = {"emotion": torch.softmax(torch.randn(b, 7, generator=g), -1),
           "emotion_mask": torch.tensor([True, False, True][:b]),
           "bentham": torch.rand(b, 10, generator=g),
           "bentham_mask": torch.rand(b, 10, generator=g) > 0.4,
           "regret": torch.randn(b, generator=g), "regret_mask": torch.tensor([False, True, True][:b]),
           "surd": torch.softmax(torch.randn(b, 4, generator=g), -1),
           "surd_mask": torch.tensor([True, True, False][:b])}
    return out, tgt


def counts_of(tgt):
    return {h: int(tgt[f"{h}_mask"].sum()) for h in ("emotion", "bentham", "regret", "surd")}


def test_masked_out_sample_contributes_nothing_and_gets_zero_gradient():
    out, tgt = batch()
    counts = counts_of(tgt)
    total, parts = task_loss(out, tgt, counts, HEAD_W, smoothing=0.1)
    total.backward()
    # emotion: sample 1 masked; regret: sample 0; surd: sample 2
    assert torch.count_nonzero(out["emotion"].grad[1]) == 0
    assert torch.count_nonzero(out["emotion"].grad[0]) > 0
    assert float(out["regret"].grad[0]) == 0.0 and float(out["regret"].grad[1]) != 0.0
    assert torch.count_nonzero(out["surd"].grad[2]) == 0
    bm = tgt["bentham_mask"]
    assert torch.count_nonzero(out["bentham"].grad[~bm]) == 0
    assert torch.count_nonzero(out["bentham"].grad[bm]) == int(bm.sum())

    # changing the masked-out items (outputs or targets) changes nothing
    out2, tgt2 = batch()
    with torch.no_grad():
        out2["emotion"][1] += 50.0
        out2["regret"][0] = 1e4
        out2["bentham"][~bm] = -1e3
    tgt2["emotion"][1] = torch.tensor([1.0, 0, 0, 0, 0, 0, 0])
    _, parts2 = task_loss(out2, tgt2, counts, HEAD_W, smoothing=0.1)
    for h in parts:
        assert parts2[h].item() == pytest.approx(parts[h].item(), rel=1e-6)

    # and the emotion loss equals the loss of the labelled samples alone
    keep = torch.tensor([0, 2])
    alone = soft_cross_entropy(out["emotion"][keep].detach(), tgt["emotion"][keep], 0.1).sum() / 2
    assert parts["emotion"].item() == pytest.approx(float(alone), rel=1e-6)


def _bce(z: float, y: float) -> float:
    p = 1 / (1 + math.exp(-z))
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


@pytest.mark.parametrize("values", ["bce", "mse"])
def test_task_loss_normalises_by_the_given_count(values):
    out = {"emotion": torch.zeros(2, 3), "bentham": torch.zeros(2, 2), "regret": torch.tensor([1.0, 2.0]),
           "surd": torch.zeros(2, 4)}
    tgt = {"emotion": torch.zeros(2, 3), "emotion_mask": torch.zeros(2, dtype=torch.bool),
           "bentham": torch.tensor([[1.0, 0.25], [0.0, 0.0]]),
           "bentham_mask": torch.tensor([[True, True], [False, False]]),
           "regret": torch.zeros(2), "regret_mask": torch.ones(2, dtype=torch.bool),
           "surd": torch.zeros(2, 4), "surd_mask": torch.zeros(2, dtype=torch.bool)}
    counts = {"emotion": 0, "bentham": 4, "regret": 4, "surd": 0}  # counts of the whole step
    w = {"emotion": 1.0, "bentham": 0.5, "regret": 2.0, "surd": 1.0}
    total, parts = task_loss(out, tgt, counts, w, values=values)
    assert set(parts) == {"bentham", "regret"}
    # the outputs are logits: by hand, the binary cross-entropy or the squared error of the sigmoid
    item = _bce if values == "bce" else (lambda z, y: (_sig(z) - y) ** 2)
    regret = (item(1.0, 0.0) + item(2.0, 0.0)) / 4
    bentham = (item(0.0, 1.0) + item(0.0, 0.25)) / 4
    assert parts["regret"].item() == pytest.approx(regret, rel=1e-5)
    assert parts["bentham"].item() == pytest.approx(bentham, rel=1e-5)
    assert total.item() == pytest.approx(2.0 * regret + 0.5 * bentham, rel=1e-5)


def test_value_loss_keeps_a_gradient_where_the_sigmoid_saturates():
    """A [0, 1] head whose logits were pushed far out (a dead head: constant output 1.0): the
    cross-entropy's gradient at the logit is p - y, the squared error's ~0."""
    z = torch.tensor([18.0, 25.0], requires_grad=True)
    y = torch.tensor([0.3, 0.1])
    value_loss(z, y, "bce").sum().backward()
    assert torch.allclose(z.grad, torch.sigmoid(z.detach()) - y, atol=1e-6)
    assert (z.grad > 0.6).all()
    z.grad = None
    value_loss(z, y, "mse").sum().backward()
    assert (z.grad.abs() < 1e-6).all()


def test_a_dead_regret_head_recovers_with_cross_entropy_and_stays_dead_with_squared_error():
    """The tiny network's regret tower with its output bias pushed to +17 (every prediction
    exactly 1.0 in fp32, as the collapsed head of issue 24): 60 AdamW steps on the regret loss
    bring its predictions back to the targets' mean with `bce`; with `mse` the gradient is
    exactly 0 and they stay at 1.0."""
    from redheart.config import preset
    from redheart.model.network import RedHeartNet, head_values

    cfg = preset("tiny")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 12, cfg.model.encoder_dim, generator=g)
    keep = torch.ones(16, 12, dtype=torch.bool)
    y = torch.rand(16, generator=g) * 0.5
    tgt = {"regret": y, "regret_mask": torch.ones(16, dtype=torch.bool)}
    final = {}
    for values in ("bce", "mse"):
        torch.manual_seed(0)
        net = RedHeartNet(cfg.model)
        with torch.no_grad():
            net.regret.mlp[-1].bias.fill_(17.0)
        opt = torch.optim.AdamW(net.regret.parameters(), lr=1e-2)
        for _ in range(60):
            out = net(x, keep, heads=["regret"])
            loss = per_item_losses(out, tgt, 0.0, True, values)["regret"].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            final[values] = head_values(net(x, keep, heads=["regret"]))["regret"]
    assert (final["mse"] == 1.0).all()  # still dead
    assert abs(float(final["bce"].mean() - y.mean())) < 0.05 and float(final["bce"].std()) > 0.1


def test_head_with_count_zero_is_excluded_and_gets_no_gradient():
    out, tgt = batch()
    tgt["surd_mask"] = torch.zeros(3, dtype=torch.bool)
    counts = counts_of(tgt)
    assert counts["surd"] == 0
    total, parts = task_loss(out, tgt, counts, HEAD_W)
    assert "surd" not in parts
    assert total.item() == pytest.approx(sum(v.item() for v in parts.values()))
    total.backward()
    assert out["surd"].grad is None or torch.count_nonzero(out["surd"].grad) == 0
    assert out["emotion"].grad is not None and torch.count_nonzero(out["emotion"].grad) > 0
    # with a count, the same head does get a gradient (the check above can fail)
    out, tgt = batch()
    total, parts = task_loss(out, tgt, counts_of(tgt), HEAD_W)
    total.backward()
    assert "surd" in parts and torch.count_nonzero(out["surd"].grad) > 0


def test_task_loss_with_no_counts_is_zero():
    out, tgt = batch()
    total, parts = task_loss(out, tgt, dict.fromkeys(HEAD_W, 0), HEAD_W)
    assert parts == {} and total.item() == 0.0


def test_per_item_losses_shapes():
    out, tgt = batch()
    items = per_item_losses(out, tgt, 0.0, True)
    assert items["emotion"].shape == (3,) and items["bentham"].shape == (3, 10)
    assert items["regret"].shape == (3,) and items["surd"].shape == (3,)
    assert items["emotion"][1].item() == 0.0


# ---------------------------------------------------------------- R-Drop


def test_symmetric_kl_hand_value():
    a = torch.tensor([[0.0, 0.0]])  # p = (0.5, 0.5)
    b = torch.tensor([[math.log(3.0), 0.0]])  # q = (0.75, 0.25)
    kl_pq = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    kl_qp = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(symmetric_kl(a, b)[0]) == pytest.approx(0.5 * (kl_pq + kl_qp), rel=1e-5)
    assert float(symmetric_kl(b, a)[0]) == pytest.approx(0.5 * (kl_pq + kl_qp), rel=1e-5)


def test_rdrop_zero_for_identical_outputs():
    out, tgt = batch(requires_grad=False)
    same = {k: v.clone() for k, v in out.items()}
    assert float(rdrop_consistency(out, same, tgt, counts_of(tgt))) == pytest.approx(0.0, abs=1e-7)


def test_rdrop_positive_symmetric_and_normalised():
    a, tgt = batch(seed=0, requires_grad=False)
    b, _ = batch(seed=5, requires_grad=False)
    counts = counts_of(tgt)
    ab = float(rdrop_consistency(a, b, tgt, counts))
    ba = float(rdrop_consistency(b, a, tgt, counts))
    assert ab > 0
    assert ab == pytest.approx(ba, rel=1e-6)
    # by hand: the masked sums divided by the counts
    em, bm, rm, sm = (tgt[f"{h}_mask"] for h in ("emotion", "bentham", "regret", "surd"))
    hand = (float(symmetric_kl(a["emotion"], b["emotion"])[em].sum()) / counts["emotion"]
            + float((a["bentham"].sigmoid() - b["bentham"].sigmoid()).pow(2)[bm].sum()) / counts["bentham"]
            + float((a["regret"].sigmoid() - b["regret"].sigmoid()).pow(2)[rm].sum()) / counts["regret"]
            + float(symmetric_kl(a["surd"], b["surd"])[sm].sum()) / counts["surd"])
    assert ab == pytest.approx(hand, rel=1e-5)


def test_rdrop_is_masked():
    a, tgt = batch(seed=0, requires_grad=False)
    b = {k: v.clone() for k, v in a.items()}
    # differences only on masked-out items: emotion sample 1, regret sample 0, surd sample 2
    b["emotion"][1] += torch.arange(7.0)
    b["regret"][0] += 3.0
    b["surd"][2] += torch.arange(4.0)
    b["bentham"][~tgt["bentham_mask"]] += 2.0
    assert float(rdrop_consistency(a, b, tgt, counts_of(tgt))) == pytest.approx(0.0, abs=1e-7)
    # the same difference on a labelled item counts (the difference of the values in [0, 1])
    b["regret"][1] += 2.0
    diff = float(b["regret"][1].sigmoid() - a["regret"][1].sigmoid())
    assert float(rdrop_consistency(a, b, tgt, counts_of(tgt))) == pytest.approx(diff ** 2 / 2, rel=1e-5)
    # a head with count 0 is left out
    counts = counts_of(tgt)
    counts["regret"] = 0
    assert float(rdrop_consistency(a, b, tgt, counts)) == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------- EMA


def tiny_model(w: float, b: float) -> nn.Module:
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.fill_(w)
        m.bias.fill_(b)
    return m


def set_params(m: nn.Module, w: float, b: float) -> None:
    with torch.no_grad():
        m.weight.fill_(w)
        m.bias.fill_(b)


def test_ema_decay_half_without_warmup():
    m = tiny_model(2.0, -4.0)
    ema = EMA(m, decay=0.5, warmup=False)
    set_params(m, 6.0, 8.0)
    ema.update(m)
    w = ema.weights()
    assert torch.allclose(w["weight"], torch.full((1, 2), 0.5 * 2.0 + 0.5 * 6.0))
    assert torch.allclose(w["bias"], torch.tensor([0.5 * -4.0 + 0.5 * 8.0]))
    assert ema.num_updates == 1
    set_params(m, 0.0, 0.0)
    ema.update(m)
    assert torch.allclose(ema.weights()["weight"], torch.full((1, 2), 2.0))
    # the model's own weights are untouched by the EMA
    assert torch.equal(m.weight, torch.zeros(1, 2))


def test_ema_warmup_first_decay_is_0_1():
    m = tiny_model(1.0, 1.0)
    ema = EMA(m, decay=0.999, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(10_000) == pytest.approx(0.999)
    set_params(m, 11.0, 21.0)
    ema.update(m)
    assert torch.allclose(ema.weights()["weight"], torch.full((1, 2), 0.1 * 1.0 + 0.9 * 11.0))
    assert torch.allclose(ema.weights()["bias"], torch.tensor([0.1 * 1.0 + 0.9 * 21.0]))
    set_params(m, 0.0, 0.0)
    ema.update(m)
    assert torch.allclose(ema.weights()["weight"], torch.full((1, 2), (2 / 11) * 10.0), atol=1e-6)


def test_ema_state_dict_round_trip_restores_num_updates_and_continues_the_sequence():
    m = tiny_model(1.0, 2.0)
    ema = EMA(m, decay=0.9, warmup=True)
    for v in (3.0, 5.0, 7.0):
        set_params(m, v, -v)
        ema.update(m)
    sd = ema.state_dict()
    assert sd["num_updates"] == 3
    other = EMA(tiny_model(100.0, 100.0), decay=0.9, warmup=True)
    other.load_state_dict(sd)
    assert other.num_updates == 3
    for k in ("weight", "bias"):
        assert torch.equal(other.weights()[k], ema.weights()[k])
    set_params(m, 9.0, -9.0)
    ema.update(m)
    other.update(m)  # the same decay_at(3), not decay_at(0)
    for k in ("weight", "bias"):
        assert torch.allclose(other.weights()[k], ema.weights()[k])
    # the saved state is a copy, not a view of the live shadow
    assert not torch.equal(sd["shadow"]["weight"], ema.weights()["weight"])


def test_ema_load_mismatch_fails():
    ema = EMA(tiny_model(1.0, 1.0), decay=0.9)
    with pytest.raises(KeyError):
        ema.load_state_dict({"shadow": {"weight": torch.zeros(1, 2)}, "num_updates": 1})


def test_ema_skips_frozen_parameters_and_applied_restores_weights():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    m[0].weight.requires_grad_(False)
    ema = EMA(m, decay=0.5, warmup=False)
    assert "0.weight" not in ema.names and "1.weight" in ema.names
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            p.add_(2.0)
    ema.update(m)
    live = {n: p.detach().clone() for n, p in m.named_parameters()}
    with ema.applied(m):
        assert torch.allclose(m[1].weight, before["1.weight"] + 1.0)
    for n, p in m.named_parameters():
        assert torch.equal(p, live[n])


# ---------------------------------------------------------------- schedule


def test_lr_factor_warmup_then_cosine():
    kw = {"warmup": 4, "total": 14, "min_ratio": 0.1}
    assert [lr_factor(s, **kw) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(4, **kw) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_factor(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: (1 + cos(pi/2)) / 2
    assert lr_factor(14, **kw) == pytest.approx(0.1)
    assert lr_factor(1000, **kw) == pytest.approx(0.1)  # stays at min_ratio
    # a quarter of the way: 0.1 + 0.9 * (1 + cos(pi/4)) / 2
    kw2 = {"warmup": 2, "total": 10, "min_ratio": 0.1}
    assert lr_factor(4, **kw2) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))
    assert lr_factor(4, **kw2) == pytest.approx(0.8681980515, rel=1e-9)
    # non-increasing after the warm-up
    fs = [lr_factor(s, **kw) for s in range(4, 20)]
    assert all(a >= b for a, b in zip(fs, fs[1:]))


def test_lr_factor_without_warmup_and_zero_min():
    assert lr_factor(0, 0, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(5, 0, 10, 0.0) == pytest.approx(0.5)
    assert lr_factor(10, 0, 10, 0.0) == pytest.approx(0.0)


def test_warmup_cosine_scheduler_drives_the_optimizer():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_cosine(opt, total_steps=10, warmup_ratio=0.2, min_ratio=0.1)  # warm-up 2 steps
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([1.0, 2.0, 2.0])
    assert lrs[6] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert lrs[10] == pytest.approx(0.2)


# ---------------------------------------------------------------- metrics


def test_macro_f1_hand_made():
    pred = torch.tensor([0, 0, 1, 1, 2])
    gold = torch.tensor([0, 1, 1, 1, 2])
    # class 0: tp 1 fp 1 fn 0 -> 2/3; class 1: tp 2 fp 0 fn 1 -> 4/5; class 2: 1; class 3 absent
    assert macro_f1(pred, gold, 4) == pytest.approx((2 / 3 + 4 / 5 + 1) / 3)
    assert macro_f1(gold, gold, 4) == pytest.approx(1.0)
    # a class only predicted counts (F1 0)
    assert macro_f1(torch.tensor([3, 0]), torch.tensor([0, 0]), 4) == pytest.approx((2 / 3 + 0.0) / 2)
    assert math.isnan(macro_f1(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3))


def test_pearson_hand_made():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert pearson(a, -a) == pytest.approx(-1.0)
    assert pearson(a, torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)
    assert math.isnan(pearson(a, torch.ones(4)))
    assert math.isnan(pearson(torch.tensor([1.0]), torch.tensor([2.0])))


def test_head_metrics_use_only_labelled_items():
    pred = {"emotion": torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]]),
            "bentham": torch.tensor([[1.0, 2.0], [3.0, 100.0], [0.0, 0.0]]),
            "regret": torch.tensor([1.0, 2.0, 50.0]),
            "surd": torch.zeros(3, 4)}
    tgt = {"emotion": torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 0, 0]]),
           "emotion_mask": torch.tensor([True, True, False]),
           "bentham": torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, 0.0]]),
           "bentham_mask": torch.tensor([[True, True], [True, False], [False, False]]),
           "regret": torch.tensor([0.0, 0.0, 0.0]), "regret_mask": torch.tensor([True, True, False]),
           "surd": torch.zeros(3, 4), "surd_mask": torch.zeros(3, dtype=torch.bool)}
    m = head_metrics(pred, tgt, HEAD_W)
    assert m["emotion_acc"] == pytest.approx(1.0)  # the wrong third sample is masked out
    assert m["emotion_f1"] == pytest.approx(1.0)
    assert m["bentham_mae"] == pytest.approx(1.0 / 3)  # |0| + |1| + |0| over 3 labelled items
    assert m["bentham_loss"] == pytest.approx(1.0 / 3)
    assert m["regret_mae"] == pytest.approx(1.5)
    assert m["regret_loss"] == pytest.approx(2.5)
    assert "surd_loss" not in m and "surd_mae" not in m
    assert m["loss"] == pytest.approx(m["emotion_loss"] + 1.0 / 3 + 2.5)
