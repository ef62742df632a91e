"""A head whose predictions collapse is named at each validation: in the log, the metrics
record and the end summary (issue 24: a regret head stuck at 1.0 went unnoticed for epochs)."""
from __future__ import annotations

import json

import torch

from redheart.train.metrics import collapsed_heads

from helpers import read_log, run, tiny_config


def targets(n: int = 50, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"emotion": torch.softmax(torch.randn(n, 7, generator=g) * 3, -1), "emotion_mask": torch.ones(n, dtype=torch.bool),
            "bentham": torch.rand(n, 10, generator=g), "bentham_mask": torch.rand(n, 10, generator=g) > 0.5,
            "regret": torch.rand(n, generator=g), "regret_mask": torch.ones(n, dtype=torch.bool),
            "surd": torch.softmax(torch.randn(n, 4, generator=g), -1), "surd_mask": torch.zeros(n, dtype=torch.bool)}


def healthy(n: int = 50, seed: int = 1) -> dict[str, torch.Tensor]:
    """Predictions that vary a little, as a barely trained model's do (std ~1e-2)."""
    g = torch.Generator().manual_seed(seed)
    return {"emotion": torch.randn(n, 7, generator=g) * 0.05, "bentham": 0.5 + 0.01 * torch.randn(n, 10, generator=g),
            "regret": 0.3 + 0.01 * torch.randn(n, generator=g), "surd": torch.zeros(n, 4)}


def test_healthy_predictions_are_not_flagged_and_surd_without_targets_is_not_judged():
    assert collapsed_heads(healthy(), targets()) == {}


def test_each_kind_of_collapse_is_named():
    tgt = targets()
    pred = healthy()
    pred["regret"] = torch.ones(50)  # the collapse of issue 24: a constant 1.0
    pred["emotion"] = torch.tensor([2.0, 0, 0, 0, 0, 0, 0]).repeat(50, 1)  # one distribution for every text
    pred["bentham"] = torch.where(torch.rand(50, 10) > 0.5, 1.0, 0.0)  # varies, but every value saturated
    out = collapsed_heads(pred, tgt)
    assert set(out) == {"regret", "emotion", "bentham"}
    assert out["regret"].startswith("the same output for all 50 texts (1.0000")
    assert "the same output" in out["emotion"]
    assert out["bentham"].startswith("saturated: 100%")
    pred = healthy()
    pred["regret"][3] = float("nan")
    assert collapsed_heads(pred, tgt) == {"regret": "non-finite outputs for 1 of 50 texts"}


def test_a_dead_regret_head_is_reported_in_the_log_the_record_and_the_summary(tmp_path, monkeypatch):
    """A real tiny run whose regret tower starts saturated (output bias +17: every prediction
    exactly 1.0) and trains with the squared error of the sigmoid, under which it stays dead."""
    import redheart.run

    trainer_class = redheart.run.Trainer

    def saturated(*args, **kwargs):
        trainer = trainer_class(*args, **kwargs)
        with torch.no_grad():
            trainer.model.regret.mlp[-1].bias.fill_(17.0)
        return trainer

    monkeypatch.setattr(redheart.run, "Trainer", saturated)
    out = tmp_path / "run"
    cfg = tiny_config(out, train__epochs=2, train__save_every=1, tech__value_loss="mse")
    assert run(cfg) == 0
    records = [json.loads(line) for line in next((out / "logs").glob("metrics_*.jsonl")).read_text().splitlines()]
    assert [sorted(r["collapsed"]) for r in records] == [["regret"], ["regret"]]
    assert "the same output for all" in records[1]["collapsed"]["regret"]
    log = read_log(out)
    assert "epoch 1: the regret head has collapsed on validation: the same output for all" in log
    assert "epoch 2: the regret head has collapsed" in log
    assert "WARNING: the regret head collapsed at epochs 1, 2: the same output for all" in log  # the summary


def test_the_same_start_recovers_with_the_default_loss(tmp_path, monkeypatch):
    """The default cross-entropy on the logits brings the same saturated head back within the
    first epoch (a gradient of sigmoid(z) - y instead of ~0): no collapse at epoch 2."""
    import redheart.run

    trainer_class = redheart.run.Trainer

    def saturated(*args, **kwargs):
        trainer = trainer_class(*args, **kwargs)
        with torch.no_grad():
            trainer.model.regret.mlp[-1].bias.fill_(17.0)
        return trainer

    monkeypatch.setattr(redheart.run, "Trainer", saturated)
    out = tmp_path / "run"
    cfg = tiny_config(out, train__epochs=2, train__lr=1e-2)
    assert run(cfg, analysis=False) == 0
    records = [json.loads(line) for line in next((out / "logs").glob("metrics_*.jsonl")).read_text().splitlines()]
    assert "regret" not in records[-1]["collapsed"]
    assert records[-1]["val"]["regret_mae"] < 0.4
