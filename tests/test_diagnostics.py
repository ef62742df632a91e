"""Each head's gradient at the backbone (redheart/train/diagnostics.py) on the tiny network."""
from __future__ import annotations

import math

import pytest
import torch

from redheart.config import preset
from redheart.model.network import RedHeartNet
from redheart.train.diagnostics import head_gradients
from redheart.train.losses import task_loss


def _batch(n: int = 6, length: int = 10, dim: int = 384):
    g = torch.Generator().manual_seed(0)
    states = torch.randn(n, length, dim, generator=g)
    keep = torch.arange(length)[None, :] < torch.tensor([10, 7, 4, 10, 9, 3])[:, None]
    tgt = {"emotion": torch.softmax(torch.randn(n, 7, generator=g), -1), "emotion_mask": torch.tensor([1, 1, 0, 1, 0, 1]).bool(),
           "bentham": torch.rand(n, 10, generator=g), "bentham_mask": torch.rand(n, 10, generator=g) > 0.5,
           "regret": torch.rand(n, generator=g), "regret_mask": torch.tensor([0, 1, 1, 1, 0, 1]).bool(),
           "surd": torch.softmax(torch.randn(n, 4, generator=g), -1), "surd_mask": torch.zeros(n, dtype=torch.bool)}
    counts = {h: int(tgt[f"{h}_mask"].sum()) for h in ("emotion", "bentham", "regret", "surd")}
    return states, keep, tgt, counts


def test_the_heads_gradients_add_up_to_the_training_losss_gradient_at_the_backbone():
    cfg = preset("tiny")
    torch.manual_seed(0)
    net = RedHeartNet(cfg.model).train()
    states, keep, tgt, counts = _batch(dim=cfg.model.encoder_dim)
    got = head_gradients(net, states, keep, tgt, counts, cfg.train.head_weights, cfg.tech)
    assert set(got["norm"]) == {"emotion", "bentham", "regret"}  # SURD has no target here: no gradient
    assert sum(got["share"].values()) == pytest.approx(1.0)
    assert net.training and all(p.grad is None for p in net.parameters())  # mode kept, .grad untouched
    # by linearity: |sum of the heads' gradients| = |gradient of the summed loss| (both without dropout)
    net.eval()
    out = net(states, keep, True)
    total, _ = task_loss(out, tgt, counts, cfg.train.head_weights, cfg.tech.label_smoothing, cfg.tech.smooth_surd,
                         cfg.tech.value_loss)
    total.backward()
    whole = math.sqrt(sum(float((p.grad ** 2).sum()) for n, p in net.named_parameters() if n.startswith("backbone.")))
    n = got["norm"]
    cos = got["cosine"]
    heads = list(n)
    summed = sum(n[h] ** 2 for h in heads) + 2 * sum(cos[f"{a}/{b}"] * n[a] * n[b]
                                                     for i, a in enumerate(heads) for b in heads[i + 1:])
    assert math.sqrt(summed) == pytest.approx(whole, rel=1e-4)


def test_a_heads_weight_scales_its_gradient_share():
    cfg = preset("tiny")
    torch.manual_seed(0)
    net = RedHeartNet(cfg.model)
    states, keep, tgt, counts = _batch(dim=cfg.model.encoder_dim)
    base = head_gradients(net, states, keep, tgt, counts, cfg.train.head_weights, cfg.tech)
    heavier = head_gradients(net, states, keep, tgt, counts, {**cfg.train.head_weights, "regret": 3.0}, cfg.tech)
    assert heavier["norm"]["regret"] == pytest.approx(3 * base["norm"]["regret"], rel=1e-5)
    assert heavier["norm"]["emotion"] == pytest.approx(base["norm"]["emotion"], rel=1e-5)
    assert heavier["share"]["regret"] > base["share"]["regret"]
