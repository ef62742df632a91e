"""No internal error is reachable from the command line (issue 27's acceptance; the part for
`predict` and `validate`): random bytes as predict's input (stdin, --file, arguments) and random
argument lists for predict and validate end in a result, or in one `error:` line with exit code
2 (validate: exit code 1 when a check fails), never in "internal error" or a traceback.

The commands run in this process through `redheart.cli.main(argv)`, with stdin a byte stream as
a real process has and the working directory a temporary one. The checkpoint is an untrained
tiny model made once for the module; the Predictor of it is loaded once and reused (its input
checks and inference are the real ones; only the loading of the encoder is not repeated).
validate's three checks that do not read the arguments (package versions, the encoder, a
forward/backward step of the model of the preset) are replaced by stubs here; every other check
runs. A few whole validate commands run as real processes.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import ROOT, SAMPLE

import redheart.predict
import redheart.validate
from redheart.cli import main

from test_predict_errors import make_checkpoint

PROPERTY = settings(deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])
HEADS = {"text", "emotion", "bentham", "regret", "surd"}
# A check that crashes is reported by validate as `[FAIL] name  Type: message`: these types are
# the user's errors, every other one an internal error in disguise.
USER_ERROR_TYPES = {"DataError", "ConfigError", "CheckpointError", "EncoderError", "UsageError", "OSError",
                    "FileNotFoundError", "NotADirectoryError", "IsADirectoryError", "PermissionError",
                    "FileExistsError"}
TRIED: dict[str, int] = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The files the arguments can name, under a folder that is the working directory."""
    d = tmp_path_factory.mktemp("cli_property")
    f = {
        "ckpt": make_checkpoint(d / "tiny.pth"),
        "text_ckpt": d / "notes.pth", "empty": d / "empty.txt", "binary": d / "random.bin",
        "zip_garbage": d / "broken.pt", "texts": d / "texts.txt", "folder": d / "folder",
        "sample": SAMPLE, "array": d / "array.json", "mixed": d / "mixed.jsonl", "bad_line": d / "bad.jsonl",
        "yaml": d / "ok.yaml", "missing": d / "missing.jsonl",
    }
    f["text_ckpt"].write_text("these are my notes\n")
    f["empty"].write_bytes(b"")
    f["binary"].write_bytes(bytes(range(256)) * 2)
    f["zip_garbage"].write_bytes(b"PK\x03\x04" + b"\x00garbage" * 10)
    f["texts"].write_text("I lied to my friend.\n\nI returned the wallet.\n")
    f["folder"].mkdir()
    sample = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:20]]
    f["array"].write_text(json.dumps(sample))
    f["mixed"].write_text(json.dumps(sample[0]) + "\n" + json.dumps({**sample[1], "regret_factor": 0.2}) + "\n")
    f["bad_line"].write_text(json.dumps(sample[0]) + "\n{\"text\": \n")
    f["yaml"].write_text("train:\n  epochs: 1\n")
    return d, f


class CachedPredictor:
    """redheart.predict.Predictor, loaded once per (checkpoint, device) of the good checkpoint."""

    def __init__(self, real, good: str):
        self.real, self.good, self.cache = real, good, {}

    def __call__(self, checkpoint, device="cpu", *args, **kwargs):
        if str(checkpoint) != self.good:
            return self.real(checkpoint, device, *args, **kwargs)
        key = str(device)
        if key not in self.cache:
            self.cache[key] = self.real(checkpoint, device, *args, **kwargs)
        return self.cache[key]


@pytest.fixture(scope="module")
def cli(world):
    """cli(argv, stdin bytes) -> (exit code, stdout, stderr) of main(argv) in the world's folder,
    predict's good Predictor cached and validate's argument-free checks stubbed."""
    d, f = world
    stub = lambda *a, **k: ("ok", "stubbed in this test")  # noqa: E731
    mp = pytest.MonkeyPatch()
    mp.setattr(redheart.predict, "Predictor", CachedPredictor(redheart.predict.Predictor, str(f["ckpt"])))
    for name in ("check_versions", "check_encoder", "check_step"):
        mp.setattr(redheart.validate, name, stub)
    mp.delenv("SAMPLES", raising=False)
    mp.delenv("REDHEART_FAULTS", raising=False)
    mp.chdir(d)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: on a shared machine more threads only wait on each other

    def call(argv: list[str], stdin: bytes = b"") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        old_stdin = sys.stdin
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors="surrogateescape")
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(argv)
                except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
                    code = 0 if exc.code is None else exc.code
        finally:
            sys.stdin = old_stdin
        TRIED[argv[0]] = TRIED.get(argv[0], 0) + 1
        return code, out.getvalue(), err.getvalue()

    yield call
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module", autouse=True)
def figures(request):
    yield
    if TRIED:
        capman = request.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():
            print(f"\ncommand-line property figures: random command lines, none an internal error: predict "
                  f"{TRIED.get('predict', 0)}, validate {TRIED.get('validate', 0)} (of which "
                  f"{TRIED.get('of them validated', 0)} got as far as the checks)")


def no_internal_error(code: int, out: str, err: str, codes: tuple[int, ...] = (0, 2)) -> None:
    assert "internal error" not in err and "Traceback" not in err + out, err
    assert code in codes, (code, err)
    if code == 2:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err


def predicted(out: str) -> list[dict]:
    rows = [json.loads(line) for line in out.splitlines()]  # one a line by any splitter: U+2028 comes escaped
    assert out.endswith("\n") and all(set(r) == HEADS for r in rows), rows
    return rows


def lines_of(data: bytes) -> list[str]:
    """The texts predict must read from these bytes (if they are UTF-8 text): one a line, lines
    ending at \n or \r\n only (U+2028 and the like are characters of a text)."""
    lines = data.decode("utf-8").removeprefix("\ufeff").split("\n")
    return [t.removesuffix("\r") for t in lines if t.strip()]


# ---------------------------------------------------------------------------------------------
# predict: random bytes as its input

# Bytes that make up UTF-8 texts, and those that break them, more often than uniform bytes do.
TEXTY = st.one_of(
    st.binary(max_size=120),
    st.lists(st.sampled_from([b"a", b" ", b"\n", b"\r", b"\r\n", b"\t", b"\x00", b"\xff", b"\xfe", b"\xc3",
                              b"\xc3\xa9", b"\xed\xa0\x80", b"\xef\xbb\xbf", "한".encode(), "\u2028".encode(),
                              "😀".encode(), b"\xf0\x9f", b"word", b"-", b"--file"]),
             max_size=40).map(b"".join),
)


@settings(PROPERTY, max_examples=150)
@given(data=TEXTY, where=st.sampled_from(["stdin", "file", "arguments"]))
def test_random_bytes_as_predict_input(cli, world, data, where):
    d, f = world
    argv = ["predict", "--checkpoint", str(f["ckpt"])]
    stdin = b""
    if where == "stdin":
        stdin = data
    elif where == "file":
        (d / "input.txt").write_bytes(data)
        argv += ["--file", "input.txt"]
    else:
        args = [os.fsdecode(a) for a in data.split(b"\x00")]  # an argument holds no NUL byte
        argv += ["--", *args]
    code, out, err = cli(argv, stdin)
    no_internal_error(code, out, err)
    pieces = data.split(b"\x00") if where == "arguments" else [data]
    if not all(_is_utf8(p) for p in pieces):
        assert code == 2 and "not UTF-8 text" in err, err
        return
    want = args if where == "arguments" else lines_of(data)
    if want and all(t.strip() for t in want):  # UTF-8 text, with something to predict: predicted
        assert code == 0, err
        assert [r["text"] for r in predicted(out)] == want
    else:
        assert code == 2, out


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# predict and validate: random argument lists


def _paths(f) -> st.SearchStrategy[str]:
    return st.sampled_from([str(f[k]) for k in f] + ["", ".", "..", "/", "nowhere/x.pth", "-", "--"])


ODD_TEXT = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=12)
FROM_BYTES = st.binary(min_size=1, max_size=12).filter(lambda b: b"\x00" not in b).map(os.fsdecode)
WORDS = st.one_of(ODD_TEXT, FROM_BYTES, st.sampled_from(["0", "-1", "1e309", "nan", "auto", "cpu", "cuda", "cuda:1",
                                                         "xyz", "=", "a=b", "tiny", "730m", "--", "-"]))


@st.composite
def predict_argv(draw, f):
    flags = {"--checkpoint": _paths(f), "--file": _paths(f), "--device": st.one_of(st.sampled_from(
        ["cpu", "cuda", "cuda:0", "cuda:7", "xyz", "", "meta", "cpu:0", "CPU"]), WORDS)}
    argv = ["predict"]
    if draw(st.integers(0, 3)):
        argv += ["--checkpoint", str(f["ckpt"])]
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flag", "flag", "text", "switch", "joined"]))
        if kind in ("flag", "joined"):
            flag = draw(st.sampled_from(sorted(flags)))
            value = draw(flags[flag])
            argv += [f"{flag}={value}"] if kind == "joined" else [flag, value]
        elif kind == "switch":
            argv.append(draw(st.sampled_from(["--debug", "--help", "-h", "--verbose", "--file", "--checkpoint"])))
        else:
            argv.append(draw(WORDS))
    return argv


@settings(PROPERTY, max_examples=150)
@given(data=st.data(), stdin=st.binary(max_size=40))
def test_random_argv_for_predict(cli, world, data, stdin):
    _, f = world
    argv = data.draw(predict_argv(f))
    code, out, err = cli(argv, stdin)
    no_internal_error(code, out, err)
    if code == 0 and not {"-h", "--help"} & set(argv):
        assert predicted(out)


# Config keys whose values cannot make a check allocate much (the preset is always tiny here).
SET_KEYS = ["train.epochs", "train.lr", "train.seed", "train.micro_batch", "train.grad_accum", "train.device",
            "train.save_every", "train.keep_checkpoints", "tech.rdrop_alpha", "tech.ema_decay", "model.dropout",
            "data.max_records", "data.encoder_cache", "sweep.steps", "bogus.key", "train", "train.nope"]
SET_VALUES = st.one_of(st.sampled_from(["0", "1", "-1", "2", "0.5", "abc", "", "nan", "inf", "-inf", "1e309",
                                        "[1, 2]", "{a: 1}", "true", "null", "99999999999999999999", "on", "'1'"]),
                       ODD_TEXT)
INTS = st.one_of(st.integers(-3, 5).map(str), st.sampled_from(["10" * 12, "-0", "1.5", "abc", "", "0x10"]))
FLOATS = st.one_of(st.sampled_from(["1e-3", "0", "-1", "nan", "inf", "1e309", "1e-400", "abc", ""]), WORDS)
YAML_TEXT = st.one_of(st.binary(max_size=60), st.sampled_from([
    b"train:\n  epochs: 1\n", b"train: [1\n", b"- a\n", b"train:\n  epochs: 1e999\n", b"model:\n  dropout: .nan\n",
    b"train:\n  seed: 99999999999999999999999\n", b"&a [*a]\n", b"train: !!python/object:os.system {}\n",
    b"train:\n  device: cuda:99\n", b"data:\n  paths: [/nowhere]\n", b"\xff\xfe", b"{}", b"null"]))


@st.composite
def validate_argv(draw, f):
    paths = _paths(f)
    data_specs = st.one_of(paths, paths.map(lambda p: f"canonical:{p}"), paths.map(lambda p: f"redheart:{p}"),
                           paths.map(lambda p: f"bogus:{p}"), WORDS)
    out_dirs = st.one_of(st.sampled_from(["out", "folder", "random.bin", "texts.txt", "a/b/c", "."]),
                         ODD_TEXT.map(lambda s: "o_" + s.replace("/", "_")))
    flags = {
        "--preset": st.sampled_from(["tiny", "huge", ""]), "--data": data_specs, "--output-dir": out_dirs,
        "--resume": st.one_of(paths, st.just("latest")), "--samples": INTS, "--epochs": INTS,
        "--batch-size": st.one_of(INTS, st.just("auto")), "--max-records": INTS, "--lr": FLOATS, "--seed": INTS,
        "--device": st.sampled_from(["cpu", "auto", "cuda", "cuda:3", "xyz", "", "cuda:x"]),
        "--config": st.just("random.yaml"), "--set": st.tuples(st.sampled_from(SET_KEYS), SET_VALUES).map("=".join),
        "--gpus": INTS, "--nnodes": INTS, "--node-rank": INTS, "--master-addr": WORDS, "--master-port": INTS,
        "--rdzv-endpoint": WORDS, "--target": st.sampled_from(["unified-test", "unified-train", "x"]),
    }
    argv = ["validate", "--output-dir", "out"]
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flag", "flag", "flag", "switch", "word"]))
        if kind == "flag":
            flag = draw(st.sampled_from(sorted(flags)))
            argv += [flag, draw(flags[flag])]
        elif kind == "switch":
            argv.append(draw(st.sampled_from(["--restart", "--lr-sweep", "--no-lr-sweep", "--skip-bad-records",
                                              "--debug", "--verbose", "--help", "--preset", "--set"])))
        else:
            argv.append(draw(WORDS))
    return argv


FAILED_CHECK = re.compile(r"^\[FAIL\] .{22} (\w+): ", flags=re.M)


@settings(PROPERTY, max_examples=100)
@given(data=st.data(), yaml_text=YAML_TEXT)
def test_random_argv_for_validate(cli, world, data, yaml_text):
    d, f = world
    (d / "random.yaml").write_bytes(yaml_text)
    argv = data.draw(validate_argv(f))
    code, out, err = cli(argv)
    no_internal_error(code, out, err, codes=(0, 1, 2))
    if out.startswith("validate: preset "):
        TRIED["of them validated"] = TRIED.get("of them validated", 0) + 1
    crashed = {m for m in FAILED_CHECK.findall(out) if m.endswith(("Error", "Exception"))} - USER_ERROR_TYPES
    assert not crashed, out
    if code == 1:
        assert "[FAIL]" in out, out + err


# ---------------------------------------------------------------------------------------------
# validate as real processes (all of it: versions, encoder, a step)


@pytest.mark.parametrize("spec, status, fragment", [
    ("array", "ok  ", "20 records from 1 file(s); with targets: emotion 20, bentham 20, regret 20, surd 20"),
    ("mixed", "FAIL", "mixed.jsonl:2: regret_factor: a redheart target, which the canonical importer would drop"),
])
def test_validate_reports_a_json_array_and_a_mixed_file(world, spec, status, fragment):
    d, f = world
    env = {k: v for k, v in os.environ.items() if k not in ("SAMPLES", "REDHEART_FAULTS")}
    proc = subprocess.run([sys.executable, "-m", "redheart", "validate", "--data", str(f[spec]), "--output-dir",
                           str(d / f"v_{spec}")], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("[") and " data " in x]
    assert line.startswith(f"[{status}] data ") and fragment in line, proc.stdout
    assert proc.returncode == (0 if status == "ok  " else 1), proc.stdout + proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
