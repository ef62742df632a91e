"""`redheart predict` on bad input (issue 27, items 8 and 9): text that is not UTF-8 on stdin, in
--file or in an argument, a device that is not there or is no device, and --debug. Each is one
`error:` line naming where the fault is, exit code 2, never an internal error.

The checkpoint is an untrained tiny model (made in a fraction of a second: what predict does
with bad input does not depend on the weights). The cases run in this process through
`redheart.cli.main`, with stdin a byte stream as a real process has; the issue's own commands
also run as real processes, started together when the module starts.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from helpers import ROOT

from redheart.cli import main
from redheart.config import preset
from redheart.model.network import RedHeartNet

TEXT = "I lied to my friend and she found out."


def make_checkpoint(path: Path) -> Path:
    """An untrained tiny model saved as a checkpoint predict reads (config and weights)."""
    cfg = preset("tiny")
    torch.manual_seed(0)
    torch.save({"config": cfg.to_dict(), "model_state": RedHeartNet(cfg.model).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pth")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: on a shared machine more compute threads only wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def byte_stdin(data: bytes) -> io.TextIOWrapper:
    """stdin as Python sets it up for a process (UTF-8, surrogateescape as under a C/UTF-8 locale)."""
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape")


def predict(argv: list[str], capsys, monkeypatch, stdin: bytes = b"") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", byte_stdin(stdin))
    try:
        code = main(["predict", *argv])
    except SystemExit as exc:  # a usage error of the parser
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def only_error(err: str) -> str:
    """The one line of stderr, which must be an `error:` line."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "internal error" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# item 8: text that is not UTF-8


def test_stdin_not_utf8_names_its_line(checkpoint, capsys, monkeypatch):
    code, out, err = predict(["--checkpoint", str(checkpoint)], capsys, monkeypatch,
                             stdin=f"{TEXT}\n\nabc\xff\xfedef\n".encode("latin-1"))
    assert (code, out) == (2, "")
    assert only_error(err) == "error: stdin line 3: not UTF-8 text (byte 0xff at column 4)"


def test_file_not_utf8_names_file_and_line(checkpoint, tmp_path, capsys, monkeypatch):
    texts = tmp_path / "texts.txt"
    texts.write_bytes(TEXT.encode() + b"\nfine too\n\xe9t\xe9\n")  # Latin-1, not UTF-8
    code, out, err = predict(["--checkpoint", str(checkpoint), "--file", str(texts)], capsys, monkeypatch)
    assert (code, out) == (2, "")
    assert only_error(err) == f"error: {texts}:3: not UTF-8 text (byte 0xe9 at column 1)"


def test_argument_not_utf8_names_the_argument(checkpoint, capsys, monkeypatch):
    # Python reads an argument's bytes that are not UTF-8 as surrogates ("a\xff" -> "a\udcff")
    code, out, err = predict(["--checkpoint", str(checkpoint), TEXT, os.fsdecode(b"a\xff")], capsys, monkeypatch)
    assert (code, out) == (2, "")
    assert only_error(err) == "error: argument 2: not UTF-8 text (byte 0xff at column 2)"


def test_utf8_text_of_any_script_is_predicted(checkpoint, tmp_path, capsys, monkeypatch):
    """Each line of the input is one text, whatever characters it holds (a line separator
    U+2028 or a next-line U+0085 inside a text does not cut it), and each comes back as one
    JSON line that any line splitter reads whole."""
    texts = ["오늘은 좋은 날", "ça va \u2028 ok", "next\x85line \u2029", "emoji \U0001f600", "tab\tand\x00nul"]
    code, out, err = predict(["--checkpoint", str(checkpoint)], capsys, monkeypatch,
                             stdin="\ufeff".encode() + "\r\n".join(texts).encode() + b"\r\n")
    assert code == 0, err
    assert [json.loads(line)["text"] for line in out.splitlines()] == texts


def test_the_python_api_refuses_text_that_is_not_unicode(checkpoint):
    from redheart.predict import Predictor

    with pytest.raises(ValueError, match=r"^text 2: not valid Unicode \(an unpaired surrogate at character 2\)$"):
        Predictor(checkpoint)([TEXT, "a\ud800b"])


# ---------------------------------------------------------------------------------------------
# item 9: --device and --debug


def _device_error(device: str) -> str:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not n:
        return f"error: --device {device}: no CUDA GPU is visible to PyTorch (use --device cpu)"
    return f"error: --device {device}: only {n} CUDA GPU(s) visible (use --device cpu or cuda:0 .. cuda:{n - 1})"


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:99"])
def test_a_gpu_that_is_not_there(checkpoint, capsys, monkeypatch, device):
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.split(":")[1]) if ":" in device else 0
    if index < n:
        pytest.skip(f"{device} is there")
    code, out, err = predict(["--checkpoint", str(checkpoint), "--device", device, TEXT], capsys, monkeypatch)
    assert (code, out) == (2, "")
    assert only_error(err) == _device_error(device)


@pytest.mark.parametrize("device", ["xyz", "", "cuda:abc", "cuda:-1", "meta", "cpu:0:1", "gpu"])
def test_not_a_device(checkpoint, capsys, monkeypatch, device):
    code, out, err = predict(["--checkpoint", str(checkpoint), "--device", device, TEXT], capsys, monkeypatch)
    assert (code, out) == (2, "")
    assert only_error(err) == f"error: --device {device}: not a device predict can use (cpu, cuda or cuda:N)"


@pytest.mark.parametrize("option", ["--checkpoint", "--file", "--device"])
def test_an_option_whose_value_is_two_dashes(checkpoint, capsys, monkeypatch, option):
    """argparse reads `--file=--` as no value at all (a list): found by the property test as an
    internal TypeError."""
    argv = [f"{option}=--", TEXT] if option == "--checkpoint" else ["--checkpoint", str(checkpoint), f"{option}=--", TEXT]
    code, out, err = predict(argv, capsys, monkeypatch, stdin=TEXT.encode())
    assert (code, out) == (2, "")
    assert only_error(err) == (f"error: redheart predict: argument {option}: expected one value, got none "
                               f"(see redheart predict --help)")


def test_debug_is_accepted(checkpoint, capsys, monkeypatch):
    code, out, err = predict(["--debug", "--checkpoint", str(checkpoint), TEXT], capsys, monkeypatch)
    assert code == 0, err
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["text"] == TEXT


# ---------------------------------------------------------------------------------------------
# the issue's commands, as real processes


@pytest.fixture(scope="module")
def issue_commands(checkpoint):
    """name -> the finished process of each of the issue's commands (started together)."""
    c = str(checkpoint)
    commands = {
        "stdin": ([c], b"abc\xff\xfedef\n"),
        "argument": ([c, b"a\xff"], b""),
        "cuda": ([c, "--device", "cuda", TEXT], b""),
        "xyz": ([c, "--device", "xyz", TEXT], b""),
        "debug": ([c, "--debug", TEXT], b""),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one(item):
        name, (args, stdin) = item
        cmd = [sys.executable, "-m", "redheart", "predict", "--checkpoint", *args]
        return name, subprocess.run(cmd, cwd=ROOT, env=env, input=stdin, capture_output=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, commands.items()))


@pytest.mark.parametrize("name, expected", [
    ("stdin", "error: stdin line 1: not UTF-8 text (byte 0xff at column 4)"),
    ("argument", "error: argument 1: not UTF-8 text (byte 0xff at column 2)"),
    ("cuda", None),
    ("xyz", "error: --device xyz: not a device predict can use (cpu, cuda or cuda:N)"),
])
def test_the_issue_commands_get_one_clear_error_and_exit_code_2(issue_commands, name, expected):
    proc = issue_commands[name]
    err = proc.stderr.decode("utf-8", "backslashreplace")
    if name == "cuda" and torch.cuda.is_available():
        assert proc.returncode == 0, err  # there is a GPU: it is used
        return
    assert (proc.returncode, proc.stdout) == (2, b""), err
    assert only_error(err) == (expected or _device_error("cuda"))


def test_the_issue_debug_command_predicts(issue_commands):
    proc = issue_commands["debug"]
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] == TEXT


def test_a_checkpoint_whose_saved_config_is_bad_is_refused_naming_the_field(checkpoint, tmp_path, capsys, monkeypatch):
    """An edited checkpoint whose config cannot build its model (heads not dividing the width):
    one error line naming the field, not a reshape error from inside the attention."""
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["config"]["model"]["heads"] = 7
    bad = tmp_path / "edited.pth"
    torch.save(ckpt, bad)
    code, out, err = predict(["--checkpoint", str(bad), TEXT], capsys, monkeypatch)
    assert (code, out) == (2, "")
    assert only_error(err) == "error: saved config: model.heads: must divide model.hidden=64 (got 7)"
