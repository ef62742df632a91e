"""--resume and the training flags on the command line, in this process through `redheart.cli.main`:
a conflicting flag is refused naming what the state has; a checkpoint that cannot be resumed (a
crossover model, a text file) is named for what it is; and no argv over the training flags and
no file given as --resume ends in an internal error (a property test over random ones).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from redheart.cli import main
from redheart.config import preset


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def _fake_state(path: Path, **over) -> Path:
    """A resume state as far as --resume reads it before training: kind, config, the keys."""
    state = {"kind": "resume", "format": 1, "run_id": "20260101_000000", "config": preset("tiny").to_dict(),
             "model_state": {"w": torch.zeros(2)}, "optimizer": {}, "scheduler": {}, "ema": None, "epoch": 0,
             "step_in_epoch": 1, "global_step": 1, "micro_batch": 2, "lr": 1e-3, "history": [], "epoch_stats": {},
             "bad_steps_total": 0, "bad_steps_in_row": 0, "oom_events": [], "finished": False, **over}
    torch.save(state, path)
    return path


FIGURES = {"bad inputs refused": 0, "random command lines": 0, "internal errors": 0}


@pytest.fixture(scope="module", autouse=True)
def figures(request):
    yield
    if FIGURES["bad inputs refused"] or FIGURES["random command lines"]:
        capman = request.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():
            print("\n--resume figures: " + ", ".join(f"{k} {v}" for k, v in FIGURES.items()))


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("SAMPLES", raising=False)
    monkeypatch.delenv("REDHEART_FAULTS", raising=False)


def test_resume_refuses_each_conflicting_flag_naming_what_the_state_has(tmp_path, capsys):
    state = _fake_state(tmp_path / "state.pt")
    rc = main(["unified-train", "--preset", "v1-320m", "--batch-size", "4", "--lr", "0.5", "--set",
               "tech.rdrop_alpha=0", "--seed", "7", "--epochs", "5", "--device", "cpu", "--set", "crossover.enabled=false",
               "--resume", str(state), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    FIGURES["bad inputs refused"] += 1
    (line,) = _error_lines(err)
    assert line.startswith(f"error: --resume {state}: run 20260101_000000 was saved with other settings than the "
                           f"command line asks for, and a resumed run keeps its own: ")
    for part in ("--preset v1-320m (the state has preset = tiny)", "--batch-size 4 (the state has train.micro_batch = 2)",
                 "--lr 0.5 (the state has train.lr = 0.001)", "--set tech.rdrop_alpha=0 (the state has "
                 "tech.rdrop_alpha = 1)", "--seed 7 (the state has train.seed = 42)"):
        assert part in line, line
    # the changeable ones are not named
    assert "--epochs" not in line.split(". Leave")[0] and "--device cpu" not in line and "crossover" not in line.split(". Leave")[0]
    assert "Leave these flags out to resume" in line and "--restart" in line
    assert not (tmp_path / "out").exists()  # refused before the run's folder is made


def test_resume_with_the_saved_settings_and_changeable_flags_goes_on(tiny_run, tmp_path, capsys):
    """The state's own values, and --epochs/--device/--set train.log_every/crossover.*: accepted."""
    root, run_id = tiny_run
    out = shutil.copytree(root, tmp_path / "run")
    rc = main(["unified-train", "--preset", "tiny", "--max-records", "60", "--device", "cpu", "--set",
               "train.log_every=1", "--set", "crossover.enabled=false", "--resume", "latest", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"resumed run {run_id} at epoch 3, step 0 (global step 6)" in err and not _error_lines(err)


def test_resume_of_the_crossover_model_says_what_it_is_for(tiny_run, tmp_path, capsys):
    root, _ = tiny_run
    model = root / "checkpoints_final" / "crossover_final.pth"
    rc = main(["unified-train", "--preset", "tiny", "--resume", str(model), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    FIGURES["bad inputs refused"] += 1
    (line,) = _error_lines(err)
    assert line == (f"error: --resume {model}: this is the Parameter Crossover model (modules taken from several "
                    f"epochs' snapshots), a finished model, not a point of a training run: it cannot be resumed. Use it "
                    f"for predictions: bash run_learning.sh predict --checkpoint {model} \"some text\". To train on, give "
                    f"--resume latest (or a resume_state_*.pt) for an exact continuation, or an epoch snapshot "
                    f"(checkpoint_epoch_*.pt) to start from its weights")


@pytest.mark.parametrize("content, what", [
    (b"I lied to my friend.\nI returned the wallet.\n", "a text file beginning 'I lied to my friend.\\nI returned the wall'"),
    (b"abc\xff\xfedef\n", "a file of unknown kind (its first bytes: 61 62 63 ff fe 64 65 66 0a)"),
])
def test_a_file_that_is_not_a_checkpoint_is_said_to_be_none(tmp_path, capsys, content, what):
    """Not `holds pickled Python objects ... could run code`: a text file holds no pickle at all."""
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    rc = main(["unified-train", "--preset", "tiny", "--resume", str(path), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    FIGURES["bad inputs refused"] += 1
    (line,) = _error_lines(err)
    assert line.startswith(f"error: {path} is not a checkpoint: {what}, where a checkpoint is a file written by this "
                           f"system"), line
    assert "pickled" not in line


def test_the_safetensors_copy_given_as_a_checkpoint_points_to_the_pth(tiny_run, tmp_path, capsys):
    root, _ = tiny_run
    st = root / "checkpoints_final" / "crossover_final.safetensors"
    assert main(["unified-train", "--preset", "tiny", "--resume", str(st), "--output-dir", str(tmp_path / "o")]) == 2
    FIGURES["bad inputs refused"] += 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert f"{st} is a safetensors file (weights only, no config), not a checkpoint of this system" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="the default preset is refused only without a GPU")
def test_unified_train_without_a_gpu_refuses_the_default_730m_with_the_estimate_and_what_to_do(tmp_path, capsys):
    """`bash run_learning.sh unified-train --epochs 30` on a CPU machine: not 730m picked without
    a word (a first step of many minutes, deaf to SIGTERM), but a refusal with the estimate."""
    rc = main(["unified-train", "--epochs", "30", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    FIGURES["bad inputs refused"] += 1
    (line,) = _error_lines(err)
    assert re.fullmatch(r"error: unified-train without a GPU: its default preset 730m \(730M parameters\) needs an "
                        r"estimated \d+\.\d GiB of memory \(this machine has \d+\.\d GiB\) and about \d+ (min|h|days) per "
                        r"optimizer step of 64 texts on this CPU \(\d+ GFLOP/s measured\), [\d.]+ (min|h|days) for \d+ steps "
                        r"\(30 epochs of this data\)\. Train it on a machine with a GPU; or give --preset tiny for a run "
                        r"this CPU finishes in minutes; or --preset 730m to train it here all the same \(.+\)", line), line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# The property: random argv over the training flags, random files as --resume


VALUES = {  # flag -> (sound values, wrong ones)
    "--preset": (["tiny"], ["huge", ""]),
    "--epochs": (["1", "2"], ["0", "-3", "x"]),
    "--batch-size": (["1", "4", "auto"], ["0", "big", "-1", "2.5"]),
    "--lr": (["1e-4", "0.5"], ["-1", "nan", "inf", "abc", "0"]),
    "--seed": (["0", "7"], ["x", "-1", "99999999999999999999"]),
    "--max-records": (["60", "40"], ["0", "-5", "x", "3"]),
    "--samples": (["1", "2"], ["0", "x", "-2"]),
    "--set": (["tech.rdrop_alpha=0", "crossover.enabled=false", "train.log_every=1", "train.grad_accum=2", "train.resume_every_minutes=0",
               "data.val_frac=0.2", "train.head_weights.surd=2"],
              ["train.lr=2", "train.nope=1", "x", "train.epochs=", "model.hidden=63", "train.betas=[0.9]",
               "data.val_frac=0.99", "=", "train=5", "train.grad_accum=0", "model.heads=3", "train.head_weights.surd=-1",
               "data.train_frac=1", "train.log_every=0", "train.resume_states_kept=0", "train.resume_every_minutes=-1", "memory.swap=maybe",
               "train.micro_batch=1000000"]),
    "--device": (["cpu", "auto"], ["cuda", "cuda:7", "xyz", "", "mps"]),
    "--gpus": (["1"], ["0", "x"]),
    "--nnodes": (["1"], ["0"]),
}
SWITCHES = ["--restart", "--skip-bad-records", "--lr-sweep", "--no-lr-sweep", "--debug", "--verbose"]


def _files(d: Path, run: Path) -> list[Path | str]:
    """Things a user may give to --resume, --data or --config: every kind of wrong file, and
    real checkpoints of a finished tiny run (a crossover model, a snapshot, resume states)."""
    d.mkdir()
    rng = random.Random(5)
    files: list[Path | str] = []

    def put(name: str, data: bytes) -> None:
        (d / name).write_bytes(data)
        files.append(d / name)

    ck = run / "checkpoints_final"
    state = sorted(ck.glob("resume_state_*.pt"))[-1]
    put("random.pt", bytes(rng.randrange(256) for _ in range(3000)))
    put("empty.pt", b"")
    put("text.pt", b"hello\n")
    put("json.pt", json.dumps({"model_state": 1}).encode())
    put("truncated.pt", state.read_bytes()[:20000])
    put("flipped.pt", bytes(b ^ 0xFF if 200 < i < 260 else b for i, b in enumerate(state.read_bytes()[:4096])))
    put("yaml.yaml", b"train: {epochs: [1\n")
    put("binary.yaml", b"\xff\xfe\x00")
    put("records.jsonl", b'{"id": "a", "text": "I lied.", "regret": 0.5}\n')
    put("bad.jsonl", b'{"id": "a", "text": \n')
    with zipfile.ZipFile(d / "plain.zip", "w") as z:
        z.writestr("a.txt", "not torch")
    files.append(d / "plain.zip")
    put("pickle.pt", pickle.dumps({"model_state": {}}, protocol=2))
    torch.save({"kind": "resume", "model_state": {}, "config": {"train": {"epochs": "x"}}}, d / "badconfig.pt")
    torch.save({"kind": "resume", "model_state": {}}, d / "noconfig.pt")
    torch.save({"kind": "snapshot", "model_state": {"w": torch.zeros(1)}, "config": preset("tiny").to_dict(),
                "epoch": 1, "run_id": "x"}, d / "badsnapshot.pt")
    torch.save({"kind": "other", "model_state": {}}, d / "other.pt")
    _fake_state(d / "fake_state.pt")
    files += [d / n for n in ("badconfig.pt", "noconfig.pt", "badsnapshot.pt", "other.pt", "fake_state.pt")]
    snapshot = sorted(ck.glob("checkpoint_epoch_*.pt"))[0]
    files += [ck / "crossover_final.pth", ck / "crossover_final.safetensors", state, snapshot, d, d / "missing.pt",
              "latest"]
    return files


def _argv(rng: random.Random, files: list, tmp: Path, i: int) -> list[str]:
    """A mode, a few flags (a wrong value one time in four), often --resume with one of `files`
    (a real resume state or snapshot one time in three), sometimes --data or --config."""
    argv = [rng.choice(["unified-train", "unified-train", "unified-test", "train-local"])]
    for flag in rng.sample(sorted(VALUES), rng.randint(0, 4)):
        good, bad = VALUES[flag]
        argv += [flag, rng.choice(bad if rng.random() < 0.25 else good)]
    argv += rng.sample(SWITCHES, rng.randint(0, 2))
    real = [f for f in files if isinstance(f, Path) and f.name.startswith(("resume_state_", "checkpoint_epoch_"))]
    if rng.random() < 0.85:
        argv += ["--resume", str(rng.choice(real if rng.random() < 0.35 else files))]
    if rng.random() < 0.1:
        argv += ["--data", str(rng.choice(files))]
    if rng.random() < 0.1:
        argv += ["--config", str(rng.choice(files))]
    if "--preset" not in argv:  # never the 730m default (refused without a GPU, slow to build with one)
        argv += ["--preset", "tiny"]
    if "--max-records" not in argv:
        argv += ["--max-records", "60"]  # as the tiny run's states have it
    out = rng.choice([tmp / f"out{i}"] * 6 + [tmp / "shared"] * 3 + [files[0]])
    return [*argv, "--output-dir", str(out)]


def test_no_argv_over_the_training_flags_and_no_resume_file_is_an_internal_error(tiny_run, tmp_path, capsys,
                                                                                 monkeypatch):
    """Seeded random argv (REDHEART_PROPERTY_SEED / _CASES for others): every one ends with exit
    code 0, 2 or 75 and never `internal error` (nor, with --debug, a traceback). Training itself
    is not what is tested: a run that gets that far stops at its first step (75) or before its
    LR sweep, as a stop request would stop it."""
    import redheart.run as rrun
    from redheart.train.stopping import TrainingStopped
    from redheart.train.trainer import Trainer

    class Stops(Trainer):
        def fit(self, progress=None):
            raise TrainingStopped("stopped by the property test before its first step", None, code=75)

    def no_sweep(trainer):
        raise rrun.StopBeforeTraining("the property test")

    monkeypatch.setattr(rrun, "Trainer", Stops)
    monkeypatch.setattr("redheart.sweep.run_sweep", no_sweep)
    root, _ = tiny_run
    files = _files(tmp_path / "files", root)
    seed = int(os.environ.get("REDHEART_PROPERTY_SEED", "1"))
    rng = random.Random(seed)
    seen = {}
    for i in range(int(os.environ.get("REDHEART_PROPERTY_CASES", "40"))):
        argv = _argv(rng, files, tmp_path, i)
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse's usage errors
            rc = exc.code
        out = capsys.readouterr()
        text = out.out + out.err
        FIGURES["random command lines"] += 1
        FIGURES["internal errors"] += "internal error" in text
        assert "internal error" not in text and "Traceback" not in text, (argv, text[-3000:])
        assert rc in (0, 2, 75), (argv, rc, text[-3000:])
        errors = _error_lines(out.err)
        assert rc in (0, 75) or len(errors) == 1, (argv, text[-3000:])
        seen[rc] = seen.get(rc, 0) + 1
    assert seen.get(2, 0) > 10 and seen.get(75, 0) + seen.get(0, 0) > 0, seen
