"""Temperature scaling of the emotion shares: ECE, the fitted temperature, and the crossover
model that carries it."""
from __future__ import annotations

import json

import pytest
import torch

from redheart.train.metrics import expected_calibration_error, fit_temperature


def sampled(scale: float, n: int = 4000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax at temperature `scale` is the true distribution the labels are
    drawn from: calibrated at T = scale, over-confident below it."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, 7, generator=g) * 2
    labels = torch.multinomial(torch.softmax(true, -1), 1, generator=g).squeeze(1)
    return true * scale, torch.nn.functional.one_hot(labels, 7).float()


def test_ece_by_hand():
    # two texts, both in the top bin: shares 0.9 and 0.7, one right: |0.5 - 0.8| = 0.3
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.7, 0.3]]))
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(logits, target, bins=2) == pytest.approx(0.3)
    # with 10 bins they fall into two bins: (|1 - 0.9| + |0 - 0.7|) / 2
    assert expected_calibration_error(logits, target, bins=10) == pytest.approx(0.4)


@pytest.mark.parametrize("scale", [0.5, 1.0, 3.0])
def test_the_fitted_temperature_undoes_a_scaling_of_the_logits(scale):
    logits, target = sampled(scale)
    t = fit_temperature(logits, target)
    assert t == pytest.approx(scale, rel=0.08)
    calibrated = expected_calibration_error(logits, target, temperature=t)
    assert calibrated < 0.03
    if scale != 1.0:  # mis-scaled logits are badly calibrated until divided by t
        assert expected_calibration_error(logits, target) > 0.1


def test_the_crossover_model_carries_its_temperature_and_the_report_its_ece(tiny_run):
    from redheart.ckpt import io as ckio

    root, run_id = tiny_run
    report = json.loads((root / "checkpoints_final" / f"crossover_report_{run_id}.json").read_text())
    cal = report["calibration"]
    assert cal["fitted_on"] == "val" and cal["emotion_temperature"] > 0
    for split in ("val", "test"):
        assert 0 <= cal[split]["ece_after"] <= 1 and cal[split]["texts"] > 0
    ckpt = ckio.load(root / "checkpoints_final" / "crossover_final.pth")
    assert ckpt["calibration"]["emotion_temperature"] == cal["emotion_temperature"]
    assert "emotion_ece" in report["scores"]["crossover"]["test"]
    assert "emotion calibration: temperature" in (root / "checkpoints_final" / f"crossover_report_{run_id}.txt").read_text()


def test_predict_applies_the_crossover_models_temperature(tiny_run):
    from redheart.data.dataset import TaskData, collate
    from redheart.data.schema import EMOTIONS, Record
    from redheart.predict import Predictor

    root, _ = tiny_run
    p = Predictor(root / "checkpoints_final" / "crossover_final.pth")
    assert p.temperature != 1.0  # fitted: exactly 1.0 would mean it was never read
    text = "I lied to my friend and she found out."
    got = p(text)["emotion"]
    batch = collate(TaskData([Record(id="0", text=text)], p.tokenizer([text])), [0], p.tokenizer.pad_id)
    with torch.no_grad():
        logits = p.model(p.encoder(batch.input_ids, batch.keep), batch.keep, batch.padded)["emotion"][0]
    want = torch.softmax(logits / p.temperature, -1)
    assert [got[e] for e in EMOTIONS] == [round(float(v), 4) for v in want]
    assert Predictor(sorted((root / "checkpoints_final").glob("checkpoint_epoch_*.pt"))[-1]).temperature == 1.0
