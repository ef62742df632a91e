"""The encoder's top layers trained with the network (`model.encoder_trainable`, issue 25): the
frozen part stops short, the network's `backbone.encoder_top` starts from the encoder's own
weights, learns at `train.encoder_lr_ratio` of the LR, is saved, predicted with and resumed
exactly. Real encoder, real runs of the tiny preset."""
from __future__ import annotations

import pytest
import torch
from helpers import run, same_tensors, straight_and_resumed, tiny_config

from redheart.ckpt import io as ckio
from redheart.config import ConfigError, preset
from redheart.model.bert import BertTop
from redheart.model.encoder import DEFAULT_ENCODER, Encoder, EncoderError, Tokenizer, encoder_dir
from redheart.model.network import ENCODER_TOP, RedHeartNet
from redheart.train.update import param_groups, set_peak_lr

TEXTS = ["I lent my car to a friend and he crashed it.", "We finally won the final, after ten years!",
         "short"]


def _batch(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = Tokenizer(DEFAULT_ENCODER, 64)(texts)
    n = max(map(len, ids))
    batch = torch.tensor([i + [0] * (n - len(i)) for i in ids])
    keep = torch.tensor([[True] * len(i) + [False] * (n - len(i)) for i in ids])
    return batch, keep


def test_the_frozen_part_and_the_trained_top_start_as_the_whole_encoder():
    batch, keep = _batch(TEXTS)
    whole = Encoder(DEFAULT_ENCODER)(batch, keep)
    for n in (1, 2, 6):
        low = Encoder(DEFAULT_ENCODER, trainable=n)
        assert len(low.model.encoder.layer) == 6 - n
        top = BertTop(encoder_dir(DEFAULT_ENCODER), n, dropout=0.1).eval()
        assert all(p.requires_grad for p in top.parameters())
        with torch.no_grad():
            states = top(low(batch, keep), keep[:, None, None, :])
        real = keep.unsqueeze(-1)  # padded positions are never read
        assert torch.allclose((states * real), (whole * real), atol=1e-5), n


def test_the_network_holds_the_pretrained_top_and_draws_no_random_numbers():
    cfg = preset("tiny").model
    torch.manual_seed(0)
    plain = RedHeartNet(cfg)
    after_plain = torch.rand(3)
    cfg.encoder_trainable = 2
    torch.manual_seed(0)
    net = RedHeartNet(cfg)
    assert torch.equal(torch.rand(3), after_plain)  # the same random stream after the build
    own = {k: v for k, v in net.state_dict().items() if not k.startswith(ENCODER_TOP)}
    assert not same_tensors(own, plain.state_dict())  # every other weight as without it
    top = {k.removeprefix(ENCODER_TOP): v for k, v in net.state_dict().items() if k.startswith(ENCODER_TOP)}
    enc = Encoder(DEFAULT_ENCODER).model.state_dict()
    assert len(top) == 2 * 16
    for k, v in top.items():  # layer.0 and layer.1 of the network are the encoder's layers 4 and 5
        i = int(k.split(".")[1])
        assert torch.equal(v, enc["encoder." + k.replace(f"layer.{i}.", f"layer.{i + 4}.", 1)]), k


def test_its_parameter_groups_keep_their_lr_ratio_through_a_new_peak_lr():
    cfg = preset("tiny")
    cfg.model.encoder_trainable, cfg.train.encoder_lr_ratio = 1, 0.25
    net = RedHeartNet(cfg.model)
    opt = torch.optim.AdamW(param_groups(net, cfg, 1e-3))
    enc = [g for g in opt.param_groups if g["lr_ratio"] == 0.25]
    assert {id(p) for g in enc for p in g["params"]} == {id(p) for n, p in net.named_parameters()
                                                          if n.startswith(ENCODER_TOP)}
    assert sorted(g["weight_decay"] for g in enc) == [0.0, cfg.train.weight_decay]  # norms and biases: none
    set_peak_lr(opt, 4e-3)
    assert sorted({g["lr"] for g in opt.param_groups}) == [pytest.approx(1e-3), pytest.approx(4e-3)]


def test_a_run_trains_the_top_at_its_lr_resumes_bit_for_bit_and_predicts_with_it(tmp_path):
    from redheart.ckpt.state import read_registry
    from redheart.predict import Predictor

    straight, resumed = straight_and_resumed(tmp_path, data__max_records=40, train__epochs=2,
                                             model__encoder_trainable=1, train__encoder_lr_ratio=0.5,
                                             train__min_lr_ratio=0.1)
    assert not same_tensors(straight["model_state"], resumed["model_state"])  # bit for bit
    top = {k: v for k, v in straight["model_state"].items() if k.startswith(ENCODER_TOP)}
    assert len(top) == 16
    pretrained = Encoder(DEFAULT_ENCODER).model.state_dict()
    moved = [k for k, v in top.items()
             if not torch.equal(v.float(), pretrained[k.removeprefix(ENCODER_TOP).replace("layer.0.", "encoder.layer.5.", 1)])]
    assert len(moved) >= 12, moved  # the top layer learned (a few biases may stay near their start)
    groups = straight["optimizer"]["param_groups"]
    assert sorted(g["lr_ratio"] for g in groups) == [0.5, 0.5, 1.0, 1.0]
    lr = {g["lr_ratio"]: g["lr"] for g in groups}
    assert lr[1.0] > 0 and lr[0.5] == pytest.approx(0.5 * lr[1.0])  # the schedule kept the ratio to the end
    pred = Predictor(read_registry(tmp_path / "a")[-1]["path"], device="cpu")
    assert pred.encoder.layers == 5 and len(pred.encoder.model.encoder.layer) == 5
    got = pred(TEXTS[:2])
    assert len(got) == 2 and all(0 <= r["regret"] <= 1 for r in got)


def test_bad_settings_are_refused_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match="model.encoder_trainable"):
        tiny_config(tmp_path, model__encoder_trainable=-1)
    with pytest.raises(ConfigError, match="train.encoder_lr_ratio"):
        tiny_config(tmp_path, train__encoder_lr_ratio=0)
    with pytest.raises(EncoderError, match="model.encoder_trainable=7 but the encoder has 6 layers"):
        Encoder(DEFAULT_ENCODER, trainable=7)
    with pytest.raises(EncoderError, match="needs a plain BERT encoder"):
        Encoder(str(_not_bert(tmp_path)), trainable=1)


def _not_bert(tmp_path):
    """A copy of the encoder whose config says it is not a plain BERT."""
    import json
    import shutil

    path = tmp_path / "gelu_new"
    shutil.copytree(encoder_dir(DEFAULT_ENCODER), path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu_new"}))
    return path
