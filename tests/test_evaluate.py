"""`evaluate`: Scruples dilemmas (evaluation only) and every head's metrics on any data, from a
real tiny run trained on Scruples-format anecdotes."""
from __future__ import annotations

import json
import random

import pytest

from redheart.data.dataset import split_of
from redheart.data.schema import DataError
from redheart.evaluate import dilemma_accuracy, read_dilemmas

from helpers import cli, run, tiny_config

WORDS = ("I told my sister she could not borrow my car after she crashed it twice and now my parents "
         "say I am selfish for refusing to help family when they need it most").split()


def anecdote(i: int, rng: random.Random) -> dict:
    a, o = rng.randint(0, 9), rng.randint(0, 9)
    return {"id": f"a{i:03d}", "post_id": f"p{i}", "title": f"AITA for story {i}?",
            "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))), "action": "doing it",
            "post_type": "HISTORICAL", "label": "AUTHOR", "binarized_label": "WRONG",
            "label_scores": {"AUTHOR": a, "OTHER": o, "EVERYBODY": 1, "NOBODY": 1, "INFO": 0}}


def dilemma_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for k in range(n):
        i, j = rng.sample(range(150), 2)  # ids a120..a149 are no anecdotes of the training data
        pairs.append({"id": f"d{k}", "actions": [
            {"id": f"a{i:03d}", "description": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))},
            {"id": f"a{j:03d}", "description": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))}],
            "gold_label": rng.randint(0, 1), "controversial": k % 3 == 0})
    return pairs


@pytest.fixture(scope="module")
def scruples_run(tmp_path_factory):
    """A tiny model trained one epoch on 120 Scruples-format anecdotes, scored at the end on 20
    dilemmas (data.eval_paths): (run dir, data file, dilemmas file)."""
    root = tmp_path_factory.mktemp("scruples_run")
    rng = random.Random(0)
    data = root / "anecdotes.jsonl"
    data.write_text("".join(json.dumps(anecdote(i, rng)) + "\n" for i in range(120)))
    dilemmas = root / "dilemmas.jsonl"
    dilemmas.write_text("".join(json.dumps(p) + "\n" for p in dilemma_pairs(20, 7)))
    cfg = tiny_config(root / "run", train__epochs=1, train__save_every=1)
    cfg.data.paths = [f"scruples:{data}"]
    cfg.data.eval_paths = [f"dilemmas:{dilemmas}"]
    assert run(cfg.validate()) == 0
    return root / "run", data, dilemmas


def test_dilemma_accuracy_by_hand():
    got = dilemma_accuracy([(0.9, 0.1), (0.2, 0.7), (0.5, 0.5), (0.3, 0.1)], [0, 0, 1, 1])
    assert got == {"accuracy": (1 + 0 + 0.5 + 0) / 4, "n": 4, "ties": 1}


def test_a_bad_dilemma_line_names_the_file_the_line_and_the_field(write_file):
    good = {"id": "d1", "actions": [{"id": "x", "description": "lying"}, {"id": "y", "description": "helping"}],
            "gold_label": 0}
    path = write_file("d.jsonl", [good, {**good, "gold_label": 2}])
    with pytest.raises(DataError, match=r"d.jsonl:2: gold_label: expected 0 or 1, got 2"):
        read_dilemmas(path)
    path = write_file("e.jsonl", [good, {**good, "actions": [good["actions"][0]]}])
    with pytest.raises(DataError, match=r"e.jsonl:2: actions: expected a list of two actions"):
        read_dilemmas(path)
    assert [d.gold for d in read_dilemmas(write_file("f.jsonl", [good, good]))] == [0, 0]


def test_evaluate_dilemmas_chooses_by_the_predicted_regret_and_counts_the_trained_anecdotes(scruples_run, write_file):
    from redheart.predict import Predictor

    run_dir, _, _ = scruples_run
    ckpt = run_dir / "checkpoints_final" / "crossover_final.pth"
    pairs = dilemma_pairs(30, 1)
    path = write_file("dilemmas.jsonl", pairs)
    proc = cli("evaluate", "--checkpoint", str(ckpt), "--data", f"dilemmas:{path}", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    # the same choice from the predictions of the model, made here
    predictor = Predictor(ckpt)
    score = 0.0
    for p in pairs:
        a, b = (predictor(x["description"])["regret"] for x in p["actions"])
        score += 0.5 if a == b else float((0 if a > b else 1) == p["gold_label"])
    assert got["kind"] == "dilemmas" and got["n"] == 30
    assert got["accuracy"] == pytest.approx(score / 30, abs=1 / 30 + 1e-9)  # rounding of predict's 4 decimals may tie
    trained = sum(any(int(x["id"][1:]) < 120 and split_of(f"scruples-{x['id']}") == "train" for x in p["actions"])
                  for p in pairs)
    assert 0 < trained < 30 and got["pairs_with_an_action_from_the_training_split"] == trained
    assert got["training_split_basis"] == "the checkpoint's training data"
    assert got["controversial"]["n"] == 10
    assert "higher predicted regret" in got["rule"]


def test_the_run_scores_its_final_model_on_the_evaluation_data_as_evaluate_does(scruples_run):
    run_dir, _, dilemmas = scruples_run
    (report,) = (run_dir / "checkpoints_final").glob("crossover_report_*.json")
    (got,) = json.loads(report.read_text())["evaluations"]
    proc = cli("evaluate", "--checkpoint", str(run_dir / "checkpoints_final" / "crossover_final.pth"),
               "--data", f"dilemmas:{dilemmas}", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert got == json.loads(proc.stdout) and got["n"] == 20
    text = next((run_dir / "checkpoints_final").glob("crossover_report_*.txt")).read_text()
    assert f"evaluation on dilemmas:{dilemmas}: accuracy {got['accuracy']:.4f} of 20 dilemmas" in text


def test_evaluate_on_the_test_split_gives_the_training_reports_test_metrics(scruples_run):
    run_dir, data, _ = scruples_run
    ckpt = run_dir / "checkpoints_final" / "crossover_final.pth"
    proc = cli("evaluate", "--checkpoint", str(ckpt), "--data", f"scruples:{data}", "--split", "test", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    (report,) = (run_dir / "checkpoints_final").glob("crossover_report_*.json")
    want = json.loads(report.read_text())["scores"]["crossover"]["test"]
    assert got["split"] == "test" and got["records"] > 0
    assert set(got["metrics"]) == set(want)
    for k, v in want.items():
        assert got["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_evaluate_refuses_bad_input_with_a_clear_error(scruples_run, tmp_path):
    run_dir, _, _ = scruples_run
    ckpt = str(run_dir / "checkpoints_final" / "crossover_final.pth")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "d", "actions": [], "gold_label": 0}\n')
    for args, message in ((["--data", f"dilemmas:{bad}"], "bad.jsonl:1: actions: expected a list of two actions"),
                          (["--data", f"dilemmas:{tmp_path / 'none.jsonl'}"], "no such file"),
                          (["--data", "x", "--device", "xyz"], "--device: cpu, cuda or cuda:N"),
                          (["--data", "x", "--batch-size", "0"], "--batch-size: must be >= 1")):
        proc = cli("evaluate", "--checkpoint", ckpt, *args)
        assert proc.returncode == 2 and message in proc.stderr and "internal error" not in proc.stderr, proc.stderr


def test_eval_data_on_the_command_line_scores_the_final_model(tmp_path, write_file):
    path = write_file("dilemmas.jsonl", dilemma_pairs(6, 3))
    out = tmp_path / "run"
    proc = cli("unified-train", "--preset", "tiny", "--epochs", "1", "--max-records", "40", "--no-lr-sweep",
               "--eval-data", f"dilemmas:{path}", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report,) = (out / "checkpoints_final").glob("crossover_report_*.json")
    (got,) = json.loads(report.read_text())["evaluations"]
    assert got["kind"] == "dilemmas" and got["n"] == 6 and got["data"] == f"dilemmas:{path}"
    assert f"evaluation on dilemmas:{path}: dilemmas accuracy" in proc.stderr
    assert f"  dilemmas: accuracy {got['accuracy']:.4f} of 6 (dilemmas:{path};" in proc.stderr  # the end summary
