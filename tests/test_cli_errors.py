"""Bad input on the command line and in config files: one line `error: ...` naming what is wrong
and where it came from, exit code 2, never a traceback.

Every case is a real `python -m redheart ...` process; they all start at once (module fixture)
and each test reads its own result. Values that are wrong before any model or data is touched
fail in well under a second, before the heavy imports.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import ROOT

BAD_INPUTS_TRIED = []

TRAIN = ["unified-train", "--preset", "tiny", "--device", "cpu"]


FILES = ("malformed.yaml", "list.yaml", "type.yaml", "unknown.yaml", "range.yaml", "scalar_section.yaml",
         "binary.yaml", "empty.jsonl", "malformed.jsonl", "range.jsonl", "a_file")


def write_files(d: Path) -> None:
    f = {name: d / name for name in FILES}
    f["malformed.yaml"].write_text("train:\n  epochs: [1\n")
    f["list.yaml"].write_text("- train\n- epochs\n")
    f["type.yaml"].write_text("train:\n  epochs: abc\n")
    f["unknown.yaml"].write_text("train:\n  bogus: 1\n")
    f["range.yaml"].write_text("model:\n  dropout: 3\n")
    f["scalar_section.yaml"].write_text("train: 5\n")
    f["binary.yaml"].write_bytes(b"\xff\xfe\x00train")
    f["empty.jsonl"].write_text("")
    f["malformed.jsonl"].write_text('{"id": "a", "text": "I lied.", "regret": 0.5}\n{"id": "b", "text": \n')
    f["range.jsonl"].write_text('{"id": "a", "text": "I lied.", "regret": 1.5}\n')
    f["a_file"].write_text("not a folder\n")
    (d / "empty_dir").mkdir(exist_ok=True)


def cases(d: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    """name -> (arguments, extra environment, the expected error line as a regex), with the
    files of `write_files(d)`."""
    f = {name: d / name for name in FILES}
    out = ["--output-dir", str(d / "out")]
    q = re.escape
    return {
        "malformed YAML": ([*TRAIN, "--config", str(f["malformed.yaml"])], {},
                           rf"{q(str(f['malformed.yaml']))} line 3: not valid YAML \(.+\)"),
        "YAML not a mapping": ([*TRAIN, "--config", str(f["list.yaml"])], {},
                               rf"{q(str(f['list.yaml']))}: expected a mapping of config sections at the top level"),
        "YAML wrong type": ([*TRAIN, "--config", str(f["type.yaml"])], {},
                            rf"{q(str(f['type.yaml']))}: train.epochs: expected an integer, got 'abc'"),
        "YAML unknown key": ([*TRAIN, "--config", str(f["unknown.yaml"])], {},
                             rf"{q(str(f['unknown.yaml']))}: unknown config key 'train.bogus' \(known here: epochs, .+\)"),
        "YAML out of range": ([*TRAIN, "--config", str(f["range.yaml"])], {},
                              rf"model.dropout: must be in \[0, 1\) \(got 3.0\) \[from --config {q(str(f['range.yaml']))}\]"),
        "YAML section as a value": ([*TRAIN, "--config", str(f["scalar_section.yaml"])], {},
                                    rf"{q(str(f['scalar_section.yaml']))}: train: expected a mapping, got 5"),
        "YAML not text": ([*TRAIN, "--config", str(f["binary.yaml"])], {},
                          rf"{q(str(f['binary.yaml']))}: not a UTF-8 text file"),
        "missing config file": ([*TRAIN, "--config", str(d / "nope.yaml")], {},
                                rf"--config: no such file: {q(str(d / 'nope.yaml'))}"),
        "--set wrong type": ([*TRAIN, "--set", "train.epochs=abc"], {},
                             r"--set: train.epochs: expected an integer, got 'abc'"),
        "--set out of range": ([*TRAIN, "--set", "model.dropout=2"], {},
                               r"model.dropout: must be in \[0, 1\) \(got 2.0\) \[from --set model.dropout=2\]"),
        "--set unknown key": ([*TRAIN, "--set", "train.nope=1"], {},
                              r"--set: unknown config key 'train.nope' \(known here: .+\)"),
        "--set without =": ([*TRAIN, "--set", "train.epochs"], {}, r"--set: expected key=value, got 'train.epochs'"),
        "--set a list too short": ([*TRAIN, "--set", "train.betas=[0.9]"], {},
                                   r"train.betas: two values in \[0, 1\) \(got \[0.9\]\) \[from --set train.betas=\[0.9\]\]"),
        "--set not a number": ([*TRAIN, "--set", "train.lr=.nan"], {},
                               r"train.lr: must be in \(0, 1\) \(got nan\) \[from --set train.lr=.nan\]"),
        "--samples 0": ([*TRAIN, "--samples", "0"], {}, r"--samples/SAMPLES: must be >= 1 \(got 0\)"),
        "--samples abc": ([*TRAIN, "--samples", "abc"], {},
                          r"redheart unified-train: argument --samples: invalid int value: 'abc' "
                          r"\(see redheart unified-train --help\)"),
        "SAMPLES=abc": (["unified-test", "--preset", "tiny"], {"SAMPLES": "abc"},
                        r"SAMPLES='abc': expected a whole number"),
        "SAMPLES=-2": (["train-local", "--preset", "tiny"], {"SAMPLES": "-2"}, r"--samples/SAMPLES: must be >= 1 \(got -2\)"),
        "--batch-size -1": ([*TRAIN, "--batch-size", "-1"], {}, r"--batch-size: must be >= 1 \(got -1\)"),
        "--batch-size big": ([*TRAIN, "--batch-size", "big"], {}, r"--batch-size: a whole number or auto \(got 'big'\)"),
        "--epochs 0": ([*TRAIN, "--epochs", "0"], {}, r"train.epochs: must be >= 1 \(got 0\) \[from --epochs\]"),
        "--lr -1": ([*TRAIN, "--lr", "-1"], {}, r"train.lr: must be in \(0, 1\) \(got -1.0\) \[from --lr\]"),
        "--max-records -5": ([*TRAIN, "--max-records", "-5"], {},
                             r"data.max_records: must be >= 0 \(got -5\) \[from --max-records\]"),
        "unknown preset": (["unified-train", "--preset", "huge"], {},
                           r"redheart unified-train: argument --preset: invalid choice: 'huge' .+"),
        "a GPU that is not there": ([*TRAIN[:-2], "--device", "cuda:99"], {},
                                    r"train.device=cuda:99: (no CUDA GPU is visible to PyTorch|only \d+ CUDA GPU\(s\) "
                                    r"visible) \(use --device cpu or auto\)"),
        "bad REDHEART_FAULTS": (TRAIN, {"REDHEART_FAULTS": "{oops"}, r"REDHEART_FAULTS: not valid JSON: '\{oops'"),
        "missing data file": ([*TRAIN, "--data", str(d / "missing.jsonl"), *out], {},
                              rf"{q(str(d / 'missing.jsonl'))}: no such file or folder"),
        "empty data file": ([*TRAIN, "--data", str(f["empty.jsonl"]), *out], {},
                            rf"{q(str(f['empty.jsonl']))}: empty file: no records"),
        "a folder with no data": ([*TRAIN, "--data", str(d / "empty_dir"), *out], {},
                                  rf"{q(str(d / 'empty_dir'))}: folder holds no data files \(.+\)"),
        "malformed data line": ([*TRAIN, "--data", str(f["malformed.jsonl"]), *out], {},
                                rf"{q(str(f['malformed.jsonl']))}:2: malformed JSON \(.+\)"),
        "data value out of range": ([*TRAIN, "--data", str(f["range.jsonl"]), *out], {},
                                    rf"{q(str(f['range.jsonl']))}:1: regret: .+"),
        "varlen attention without a GPU": ([*TRAIN, "--set", "train.packing=on", "--set",
                                            "train.packed_attention=varlen", *out], {},
                                           r"train.packed_attention=varlen: FlashAttention's variable-length kernels "
                                           r"need a GPU .+; here cpu, .+"),
        "resume a missing file": ([*TRAIN, "--resume", str(d / "none.pt"), *out], {},
                                  rf"--resume {q(str(d / 'none.pt'))}: no such checkpoint \(--resume latest takes .+\)"),
        "resume latest with nothing saved": ([*TRAIN, "--resume", "latest", "--output-dir", str(d / "fresh")], {},
                                             rf"no resume state in {q(str(d / 'fresh' / 'checkpoints_final'))}: "
                                             r"nothing to resume \(start the run without --resume\)"),
        "resume a folder": ([*TRAIN, "--resume", str(d), *out], {}, rf"--resume {q(str(d))}: a folder; .+"),
        "output dir is a file": ([*TRAIN, "--output-dir", str(f["a_file"])], {},
                                 rf"\[Errno 20\] Not a directory: '{q(str(f['a_file']))}/.+'"),
        "predict, missing --file": (["predict", "--checkpoint", str(d / "none.pt"), "--file", str(d / "texts.txt")], {},
                                    rf"--file {q(str(d / 'texts.txt'))}: no such file"),
        "predict, missing checkpoint": (["predict", "--checkpoint", str(d / "none.pt"), "a text"], {},
                                        rf"--checkpoint {q(str(d / 'none.pt'))}: no such file"),
        "a flag's value read as none": (["validate", "--output-dir=--"], {},
                                         r"redheart validate: argument --output-dir: expected one value, got none "
                                         r"\(see redheart validate --help\)"),
        "info, heads not dividing": (["info", "--preset", "tiny", "--set", "model.heads=7"], {},
                                     r"model.heads: must divide model.hidden=64 \(got 7\)"),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    write_files(d)
    table = cases(d)

    def one(item):
        name, (args, extra, _) = item
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
        env.pop("REDHEART_FAULTS", None) if "REDHEART_FAULTS" not in extra else None
        env.pop("SAMPLES", None) if "SAMPLES" not in extra else None
        p = subprocess.run([sys.executable, "-m", "redheart", *args], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300, stdin=subprocess.DEVNULL)
        return name, p

    with ThreadPoolExecutor(max_workers=4) as pool:
        done = dict(pool.map(one, table.items()))
    return d, {name: (done[name], table[name][2]) for name in table}


@pytest.fixture(scope="module", autouse=True)
def figures(request):
    yield
    if BAD_INPUTS_TRIED:
        capman = request.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():
            print(f"\nbad-input figures: bad inputs tried {len(BAD_INPUTS_TRIED)}, each a one-line `error:` "
                  f"with exit code 2 and no traceback")


NAMES = list(cases(Path("/bad-input")))


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_gets_one_error_line_and_exit_code_2(results, name):
    proc, expected = results[1][name]
    BAD_INPUTS_TRIED.append(name)
    err = proc.stderr
    assert "Traceback" not in err + proc.stdout, err
    assert proc.returncode == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip().splitlines()[-1] == errors[0], err
    assert re.fullmatch(f"error: {expected}", errors[0]), errors[0]


def test_bad_data_or_resume_paths_make_no_run_folder(results):
    """The cases with `--output-dir d/out` (bad data files, bad --resume paths) stop before the
    run's folder is made: a failed start leaves nothing behind."""
    d, _ = results
    assert not (d / "out").exists(), sorted(p.name for p in (d / "out").rglob("*"))


def test_a_bad_data_file_fails_before_torch_is_imported(write_file, tmp_path):
    bad = write_file("bad.jsonl", '{"id": "a", "text": "I lied.", "regret": 1.5}\n')
    code = ("import sys; from redheart.cli import main; "
            f"rc = main(['unified-train', '--preset', 'tiny', '--data', {str(bad)!r}, '--output-dir', {str(tmp_path / 'o')!r}]); "
            "print(rc, 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("SAMPLES", "REDHEART_FAULTS")}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert p.stdout.split() == ["2", "False"], p.stdout + p.stderr
    assert f"error: {bad}:1: regret:" in p.stderr
