"""Using a trained model: `redheart predict` (arguments, --file, stdin; JSON lines out) and the
Python `Predictor`, on CPU, on the crossover model and an epoch snapshot of a tiny run."""
import io
import json
import subprocess
import sys

import pytest

from redheart.predict import Predictor

from helpers import ROOT

EMOTIONS = ["joy", "trust", "fear", "surprise", "sadness", "disgust", "anger"]
BENTHAM = ["intensity", "duration", "certainty", "propinquity", "purity", "extent", "fecundity",
           "remoteness", "succession", "utility"]
SURD = ["synergy", "unique", "redundant", "deterministic"]
TEXTS = ["I lied to my friend and she found out.",
         "After months of saving I finally paid back the money my brother lent me, and we celebrated together."]


def _checkpoints(root):
    ck = root / "checkpoints_final"
    return {"crossover": ck / "crossover_final.pth", "snapshot": sorted(ck.glob("checkpoint_epoch_0001_*.pt"))[0]}


def _check_row(row, text):
    assert row["text"] == text
    assert list(row["emotion"]) == EMOTIONS and list(row["bentham"]) == BENTHAM and list(row["surd"]) == SURD
    for dist in (row["emotion"], row["surd"]):
        assert all(0 <= v <= 1 for v in dist.values())
        assert abs(sum(dist.values()) - 1) <= 1e-3
    assert all(0 <= v <= 1 for v in row["bentham"].values())
    assert 0 <= row["regret"] <= 1


@pytest.fixture(scope="module")
def predictors(tiny_run):
    """One loaded Predictor per checkpoint (loading the encoder is the slow part)."""
    return {which: Predictor(path) for which, path in _checkpoints(tiny_run[0]).items()}


def _predict_cli(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "redheart", "predict", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("which", ["crossover", "snapshot"])
def test_predictor_gives_named_values_in_range_for_any_checkpoint(predictors, which):
    predictor = predictors[which]
    rows = predictor(TEXTS)
    assert len(rows) == 2
    for row, text in zip(rows, TEXTS):
        _check_row(row, text)
    # one text alone (no padding beside a longer one) gives the same numbers as in the batch
    alone = predictor(TEXTS[0])
    assert isinstance(alone, dict)
    for head in ("emotion", "bentham", "surd"):
        assert alone[head] == pytest.approx(rows[0][head], abs=2e-4)
    assert alone["regret"] == pytest.approx(rows[0]["regret"], abs=2e-4)
    assert predictor([]) == []
    with pytest.raises(ValueError, match="text 2: empty text"):
        predictor(["fine", "   "])


def test_cli_reads_texts_from_stdin_and_prints_what_the_python_api_gives(tiny_run, predictors):
    ckpt = _checkpoints(tiny_run[0])["snapshot"]
    proc = _predict_cli("--checkpoint", str(ckpt), stdin="\n".join(TEXTS) + "\n")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2
    for row, text in zip(rows, TEXTS):
        _check_row(row, text)
    assert rows == predictors["snapshot"](TEXTS)


def test_predict_takes_texts_as_arguments(tiny_run, predictors, capsys):
    from redheart.cli import main

    ckpt = _checkpoints(tiny_run[0])["crossover"]
    assert main(["predict", "--checkpoint", str(ckpt), *TEXTS]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == predictors["crossover"](TEXTS)


def test_predict_reads_a_file_of_texts_skipping_blank_lines(tiny_run, predictors, tmp_path, capsys):
    from redheart.cli import main

    ckpt = _checkpoints(tiny_run[0])["crossover"]
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text(f"{TEXTS[1]}\n\n{TEXTS[0]}\n", encoding="utf-8")
    assert main(["predict", "--checkpoint", str(ckpt), "--file", str(texts_file)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == predictors["crossover"](TEXTS[::-1])


def test_cli_with_empty_input_says_so_and_exits_2(tiny_run):
    proc = _predict_cli("--checkpoint", str(_checkpoints(tiny_run[0])["crossover"]), stdin="")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.strip() == "error: no texts given: stdin holds no non-blank line"


@pytest.mark.parametrize("args, stdin, message", [
    ([], "\n  \n", "no texts given: stdin holds no non-blank line"),
    (["  "], "", "text 1: empty text"),
    (["--file", "no/such/file.txt"], "", "--file no/such/file.txt: no such file"),
])
def test_predict_without_a_text_says_so_and_returns_2(tiny_run, monkeypatch, capsys, args, stdin, message):
    from redheart.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert main(["predict", "--checkpoint", str(_checkpoints(tiny_run[0])["crossover"]), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().lower().startswith(f"error: {message}")
