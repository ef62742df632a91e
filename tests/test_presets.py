"""Parameter counts of every preset, counted on the meta device, and the module map."""
import json

import pytest
import torch

from redheart.config import MODULES, preset
from redheart.model.modules import count_parameters, module_of, preset_parameter_counts
from redheart.model.network import RedHeartNet, head_values

from helpers import cli


def test_730m_preset_has_730m_trainable_parameters_within_one_percent():
    counts = preset_parameter_counts(preset("730m"))
    assert abs(counts["total"] - 730e6) <= 0.01 * 730e6, counts
    cfg = preset("730m").model
    assert (cfg.hidden, cfg.layers, cfg.heads) == (1280, 18, 20)


def test_legacy_presets_match_their_layouts():
    c800 = preset_parameter_counts(preset("v1-800m"))
    assert abs(c800["total"] - 800e6) <= 0.02 * 800e6
    assert abs(c800["backbone"] - 300e6) <= 0.03 * 300e6
    towers = sum(c800[m] for m in ("emotion", "bentham", "regret", "surd"))
    assert abs(towers - 500e6) <= 0.03 * 500e6
    c320 = preset_parameter_counts(preset("v1-320m"))
    assert abs(c320["total"] - 320e6) <= 0.02 * 320e6


def test_tiny_preset_is_small_and_runs_the_same_code():
    counts = preset_parameter_counts(preset("tiny"))
    assert counts["total"] < 2e6
    assert all(counts[m] > 0 for m in MODULES)


def test_meta_count_equals_a_real_model_count():
    cfg = preset("tiny")
    real = count_parameters(RedHeartNet(cfg.model))
    assert real == preset_parameter_counts(cfg)


def test_every_parameter_belongs_to_exactly_one_module_and_all_train():
    net = RedHeartNet(preset("tiny").model)
    owners = {name: module_of(name) for name, _ in net.named_parameters()}
    assert set(owners.values()) == set(MODULES)
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(KeyError):
        module_of("encoder.layer.0.weight")


def test_info_command_prints_counts_as_json_without_allocating():
    proc = cli("info", "--preset", "730m")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["trainable_parameters"]["total"] == preset_parameter_counts(preset("730m"))["total"]
    assert set(data["trainable_parameters"]) == set(MODULES) | {"total"}


def test_heads_have_the_right_shapes_and_ranges():
    torch.manual_seed(0)
    net = RedHeartNet(preset("tiny").model).eval()
    x = torch.randn(3, 9, 384)
    keep = torch.ones(3, 9, dtype=torch.bool)
    keep[1, 5:] = False
    logits = net(x, keep)
    out = head_values(logits)
    assert out["emotion"].shape == (3, 7) and out["surd"].shape == (3, 4)
    assert out["bentham"].shape == (3, 10) and out["regret"].shape == (3,)
    assert ((out["bentham"] >= 0) & (out["bentham"] <= 1)).all()
    assert ((out["regret"] >= 0) & (out["regret"] <= 1)).all()
    assert torch.equal(out["regret"], torch.sigmoid(logits["regret"]))  # the network gives logits
    assert torch.equal(out["emotion"], logits["emotion"])  # emotion and SURD stay logits


def test_padding_does_not_change_a_sample_output():
    torch.manual_seed(0)
    net = RedHeartNet(preset("tiny").model).eval()
    x = torch.randn(1, 6, 384)
    alone = net(x, torch.ones(1, 6, dtype=torch.bool))
    padded_x = torch.cat([x, torch.randn(1, 4, 384)], 1)
    keep = torch.tensor([[True] * 6 + [False] * 4])
    padded = net(padded_x, keep)
    for k in alone:
        assert torch.allclose(alone[k], padded[k], atol=1e-5), k
