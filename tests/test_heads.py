"""The table of heads (redheart/heads.py) is the one place a head is defined: the config and
the network agree with it, and a fifth head added as one table entry plus its loss gets a
tower, a target and mask from its records, a loss that trains it, and metrics, with no other
module edited."""
import pytest
import torch

from redheart import config, heads
from redheart.config import PRESETS, Config, TechniqueConfig, preset
from redheart.data.dataset import TaskData
from redheart.data.schema import Record
from redheart.dist import loss_keys
from redheart.heads import Head, Score, value_metrics
from redheart.model.modules import count_parameters, split_by_module
from redheart.model.network import RedHeartNet, head_values
from redheart.train.losses import task_loss
from redheart.train.metrics import collapsed_heads, head_metrics
from redheart.train.step import forward_loss


def test_the_config_and_the_network_agree_with_the_table():
    names = tuple(h.name for h in heads.HEADS)
    assert names == ("emotion", "bentham", "regret", "surd")
    assert config.HEADS == heads.names() == names
    assert config.MODULES == heads.modules() == ("backbone", *names)
    for name in PRESETS:
        assert list(preset(name).train.head_weights) == list(names), name
    assert list(Config().train.head_weights) == list(names)

    torch.manual_seed(0)
    net = RedHeartNet(preset("tiny").model)
    out = net(torch.randn(3, 5, 384), torch.ones(3, 5, dtype=torch.bool))
    assert {k: tuple(v.shape) for k, v in out.items()} == {h.name: h.shape(3) for h in heads.HEADS}
    assert {k: bool(((v >= 0) & (v <= 1)).all()) for k, v in head_values(out).items()
            if heads.get(k).kind == "values"} == {"bentham": True, "regret": True}
    assert set(count_parameters(net)) == {*heads.modules(), "total"}


def toy_loss(logits: torch.Tensor, target: torch.Tensor, opts: heads.LossOptions) -> torch.Tensor:
    """The toy head's own loss: the squared error of the sigmoid, per element."""
    return (logits.float().sigmoid() - target).pow(2)


TOY = Head(name="toy", size=3, kind="values", labels=("a", "b", "c"), loss=toy_loss, metrics=value_metrics,
           scores=(Score("mae", False), Score("r", True)), label="toy", loss_unit="squared error")


@pytest.fixture
def toy_head(monkeypatch):
    """The table with a fifth head, for the test's duration: the one change made."""
    monkeypatch.setattr(heads, "HEADS", (*heads.HEADS, TOY))


def toy_records(n: int) -> list[Record]:
    """Records of which only some carry the toy field (one element of it missing in some), and
    those without it carry regret: the toy head has targets of its own, masked per element."""
    g = torch.Generator().manual_seed(1)
    records = []
    for i in range(n):
        r = Record(id=f"r{i}", text=f"text {i}")
        if i % 4 == 3:
            r.regret = 0.5
        else:
            values = [round(float(v), 3) for v in torch.rand(3, generator=g)]
            r.toy = [None if (i % 4 == 1 and j == 2) else v for j, v in enumerate(values)]
        records.append(r)
    return records


def test_a_fifth_head_is_one_table_entry_plus_its_loss(toy_head):
    assert heads.names()[-1] == "toy" and heads.modules()[-1] == "toy" and "toy" in loss_keys()
    cfg = preset("tiny").validate()  # its head weights come from the table: toy's is there
    assert cfg.train.head_weights["toy"] == 1.0

    records = toy_records(12)
    assert records[0].to_json()["toy"] == records[0].toy and records[3].to_json()["toy"] is None
    data = TaskData(records, [[101, 7 + i, 102] for i in range(len(records))])
    tgt = data.targets(torch.arange(len(records)))
    assert tgt["toy"].shape == tgt["toy_mask"].shape == (12, 3)  # per element, as a `values` head
    assert tgt["toy_mask"].sum(1).tolist() == [3, 2, 3, 0] * 3
    counts = data.head_counts()
    assert counts == {"emotion": 0, "bentham": 0, "regret": 3, "surd": 0, "toy": 24}

    torch.manual_seed(0)
    net = RedHeartNet(cfg.model)
    assert net.head_names[-1] == "toy"
    modules = split_by_module(net.state_dict())  # the checkpoint's keys: a module of its own
    assert modules["toy"] and all(k.startswith("toy.") for k in modules["toy"])
    states = torch.randn(12, 3, cfg.model.encoder_dim)
    keep = torch.ones(12, 3, dtype=torch.bool)
    out = net(states, keep)
    assert out["toy"].shape == (12, 3)

    loss, parts = task_loss(out, tgt, counts, cfg.train.head_weights)
    assert set(parts) == {"regret", "toy"}
    expected = toy_loss(out["toy"], tgt["toy"], heads.LossOptions())[tgt["toy_mask"]].sum() / 24
    assert torch.allclose(parts["toy"], expected)
    assert torch.allclose(loss, parts["regret"] + parts["toy"])

    # a few training steps, R-Drop on: the toy head's loss falls
    tech = TechniqueConfig()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss, parts = forward_loss(net, states, keep, False, tgt, counts, tech, cfg.train.head_weights, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(parts["toy"]) if first is None else first
    assert float(parts["toy"]) < 0.3 * first, (first, float(parts["toy"]))

    net.eval()
    with torch.no_grad():
        pred = head_values(net(states, keep))
    metrics = head_metrics(pred, tgt, cfg.train.head_weights)
    assert {"toy_mae", "toy_r", "toy_loss"} <= set(metrics)
    assert metrics["toy_mae"] < 0.1 and metrics["toy_r"] > 0.8, metrics
    assert metrics["loss"] == pytest.approx(metrics["regret_loss"] + metrics["toy_loss"])
    assert ("toy_mae", False) in heads.score_keys() and "toy" not in collapsed_heads(pred, tgt)
    assert TOY.named(TOY.output(pred["toy"][0])) == {k: round(float(v), 4) for k, v in zip("abc", pred["toy"][0])}
