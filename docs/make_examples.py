"""Regenerate the README's example outputs from a real run of the command the README shows.

    python docs/make_examples.py            # run, then rewrite README.md and docs/images/
    python docs/make_examples.py --check    # run, then compare with README.md (exit 1 on drift)
    python docs/make_examples.py --check --run-dir DIR   # compare against a run made before

The run is the README's own: `bash run_learning.sh unified-test` on the shipped sample data
(without a GPU the tiny preset on the CPU, which is deterministic), into a temporary output
directory whose path is printed back as `training`, then the README's first `predict` command
on its crossover model. From its output come the README's four example blocks (the opening
screen, two progress lines, the results screen, the predict line), the sentences that quote
the run (the LR the sweep chose, what the Crossover tried) and, when writing, the pictures.

--check compares what a run prints with what the README shows, apart from what differs from
run to run and machine to machine: the run id, clock times, durations and samples/s; other
numbers may differ by one unit in their last printed digit (a rounding that one floating-point
reduction order or another tips).
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
IMAGES = ROOT / "docs" / "images"
STDERR = "unified-test.stderr"  # the run's screen output, kept in the run directory
BLOCKS = ("opening", "progress", "results", "predict")

# ---------------------------------------------------------------------------------------------
# the README's blocks and sentences


def _fences(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of the body of each ``` block."""
    return [(m.start(2), m.end(2)) for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, flags=re.M | re.S)]


def _kind(body: str) -> str | None:
    if body.startswith("Red Heart AI training run "):
        return "opening"
    if re.search(r"^\S+ INFO    epoch 1/\d+ step ", body, flags=re.M):
        return "progress"
    if re.match(r"Run \S+ finished: ", body):
        return "results"
    if body.startswith('{"text": '):
        return "predict"
    return None


def readme_blocks(text: str) -> dict[str, tuple[int, int]]:
    """Block name -> (start, end) of its body in the README; each must be there exactly once."""
    found: dict[str, list[tuple[int, int]]] = {}
    for start, end in _fences(text):
        kind = _kind(text[start:end])
        if kind:
            found.setdefault(kind, []).append((start, end))
    missing = [b for b in BLOCKS if len(found.get(b, [])) != 1]
    if missing:
        raise SystemExit(f"README.md: expected exactly one example block of each kind; not so for {', '.join(missing)}")
    return {b: found[b][0] for b in BLOCKS}


WALL_SENTENCE = re.compile(r"\(its\s+second\s+run[^)]*\)")
LR_SENTENCE = re.compile(r"the\s+score\s+that\s+chose\s+\S+?(?=\.\s)")
CROSSOVER_SENTENCE = re.compile(r"Here\s+(?:the|every)\s.+?\(gain\s[^)]*\)\.", flags=re.S)


def predict_command(text: str) -> tuple[str, str]:
    """The README's first `predict` command with a text, and that text."""
    m = re.search(r'^bash run_learning\.sh predict --checkpoint (\S+) "([^"]+)"$', text, flags=re.M)
    if not m:
        raise SystemExit('README.md: no `bash run_learning.sh predict --checkpoint PATH "text"` line found')
    return m.group(1), m.group(2)


# ---------------------------------------------------------------------------------------------
# the run


def make_run(out: Path, readme: str) -> None:
    """The README's command into `out` (its screen output kept as out/STDERR), then its predict
    command on the run's crossover model (kept as out/predict.jsonl)."""
    env = {k: v for k, v in os.environ.items() if k not in ("SAMPLES", "REDHEART_FAULTS")}
    out.mkdir(parents=True, exist_ok=True)
    cmd = ["bash", str(ROOT / "run_learning.sh"), "unified-test", "--output-dir", str(out)]
    print(f"[make_examples] {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    (out / "seconds.txt").write_text(f"{time.monotonic() - start:.0f}\n")
    (out / STDERR).write_text(proc.stderr, encoding="utf-8")
    if proc.returncode:
        raise SystemExit(f"the run failed (exit code {proc.returncode}):\n{proc.stderr[-3000:]}")
    checkpoint, sentence = predict_command(readme)
    checkpoint = checkpoint.replace("training/", f"{out}/", 1)
    cmd = ["bash", str(ROOT / "run_learning.sh"), "predict", "--checkpoint", checkpoint, sentence]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"predict failed (exit code {proc.returncode}):\n{proc.stderr[-3000:]}")
    (out / "predict.jsonl").write_text(proc.stdout, encoding="utf-8")


def _between(lines: list[str], first: str, last: str) -> str:
    """The lines from the one starting with `first` to the next one containing `last`."""
    i = next(n for n, line in enumerate(lines) if line.startswith(first))
    j = next(n for n in range(i, len(lines)) if last in lines[n])
    return "".join(line + "\n" for line in lines[i:j + 1])


def render(out: Path) -> dict[str, str]:
    """What the README shows of the run in `out`: its four blocks, and the values its
    sentences quote ("lr", "crossover"), with `out` printed as `training`."""
    stderr = (out / STDERR).read_text(encoding="utf-8").replace(f"{out}/", "training/").replace(str(out), "training")
    lines = stderr.splitlines()
    progress = [line for line in lines if re.match(r"\S+ INFO    epoch 1/\d+ step 10/", line)][:1]
    progress += [line for line in lines if re.match(r"\S+ INFO    epoch 1/\d+: train loss ", line)][:1]
    chose = next(re.search(r"LR sweep chose (\S+):", line) for line in lines if "LR sweep chose " in line)
    (report,) = (out / "checkpoints_final").glob("crossover_report_*.json")
    seconds = int((out / "seconds.txt").read_text()) if (out / "seconds.txt").is_file() else None
    return {
        "wall": None if seconds is None else f"(its second run, the environment set up: {_duration(seconds)} in all)",
        "opening": _between(lines, "Red Heart AI training run ", "TensorBoard: "),
        "progress": "".join(line + "\n" for line in progress),
        "results": _between(lines, "Run ", "  use it: "),
        "predict": (out / "predict.jsonl").read_text(encoding="utf-8"),
        "lr": f"the score that chose {float(chose.group(1)):.1e}",
        "crossover": crossover_sentence(json.loads(report.read_text(encoding="utf-8"))),
    }


def _duration(seconds: int) -> str:
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60} s"


def _swaps(trials: list[dict]) -> str:
    by_source: dict[str, list[str]] = {}
    for t in trials:
        by_source.setdefault(t["source"], []).append(t["module"])
    return "; ".join(" and ".join(mods) + f" from {src}" for src, mods in by_source.items())


def crossover_sentence(report: dict) -> str:
    """What the Crossover tried and kept, in the README's words."""
    tried = [t for t in report["trials"] if t["module"] is not None]
    kept = [t for t in tried if t["kept"]]
    rejected = [t for t in tried if not t["kept"]]
    if not tried:
        return "Here every module's sweet spot was the best epoch, so the Crossover had no swap to try (gain 0)."
    if not kept:
        count = {1: "one swap", 2: "two swaps", 3: "three swaps", 4: "four swaps"}.get(len(tried), f"{len(tried)} swaps")
        what = f"the {count}"
        return (f"Here {what} the Crossover tried ({_swaps(tried)}) made validation worse, so it kept the "
                f"best single epoch (gain 0).")
    gain = sum(t["gain"] for t in kept)
    worse = f"; {_swaps(rejected)} made it worse" if rejected else ""
    return f"Here the Crossover kept {_swaps(kept)}{worse} (gain {gain:+.4f})."


# ---------------------------------------------------------------------------------------------
# writing and comparing


def _rewrap(text: str, sentence: str) -> str:
    """`text` with the paragraph that holds `sentence` wrapped again at 94 columns."""
    start = text.rfind("\n\n", 0, text.index(sentence)) + 2
    end = text.find("\n\n", start)
    para = text[start:end].split("\n")
    tail = [line for line in para if line.startswith("The 730M")]  # the paragraph's own last line
    body = " ".join(line for line in para if line not in tail)
    return text[:start] + "\n".join([textwrap.fill(body, 94, break_on_hyphens=False), *tail]) + text[end:]


def updated(readme: str, shown: dict[str, str]) -> str:
    spans = readme_blocks(readme)
    for name in sorted(BLOCKS, key=lambda b: spans[b][0], reverse=True):  # from the end: offsets hold
        start, end = spans[name]
        readme = readme[:start] + shown[name] + readme[end:]
    if shown.get("wall"):  # how long the whole command took (not known of a run made elsewhere)
        readme = WALL_SENTENCE.sub(shown["wall"], readme, count=1)
        readme = _rewrap(readme, shown["wall"])
    readme = LR_SENTENCE.sub(shown["lr"], readme, count=1)
    readme = CROSSOVER_SENTENCE.sub(shown["crossover"], readme, count=1)
    return _rewrap(readme, shown["crossover"])


def current(readme: str) -> dict[str, str]:
    """What the README shows now, in the form of render()."""
    spans = readme_blocks(readme)
    shown = {b: readme[s:e] for b, (s, e) in spans.items()}
    shown["lr"] = " ".join(LR_SENTENCE.search(readme).group(0).split())
    shown["crossover"] = " ".join(CROSSOVER_SENTENCE.search(readme).group(0).split())
    return shown


# what differs from one run, or machine, to another
VARIABLE = [
    (re.compile(r"(?<!\d)\d{8}_\d{6}(?!\d)"), "<run>"),  # (also inside file names)
    (re.compile(r"^\d\d:\d\d:\d\d ", flags=re.M), "<clock> "),
    (re.compile(r"\b\d+(?:\.\d+)? samples/s"), "<n> samples/s"),
    (re.compile(r"\b(?:\d+h)?(?:\d+m)?\d+s\b"), "<duration>"),
]
NUMBER = re.compile(r"(-?\d+\.\d+(?:e[-+]\d+)?)")


def _masked(text: str) -> str:
    for pattern, mask in VARIABLE:
        text = pattern.sub(mask, text)
    return text


def _same(a: str, b: str) -> bool:
    """Equal apart from what varies between runs; numbers within one unit of their last digit."""
    pa, pb = NUMBER.split(_masked(a)), NUMBER.split(_masked(b))
    if len(pa) != len(pb):
        return False
    for i, (x, y) in enumerate(zip(pa, pb)):
        if i % 2 == 0:
            if x != y:
                return False
            continue
        digits = len(x.split("e")[0].split(".")[1])
        unit = 10.0 ** (-digits) * (10.0 ** int(x.split("e")[1]) if "e" in x else 1.0)
        if abs(float(x) - float(y)) > 1.01 * unit:
            return False
    return True


def differences(readme: str, shown: dict[str, str]) -> list[str]:
    """A diff for each part of the README that is not what the run shows."""
    now = current(readme)
    out = []
    for name in (*BLOCKS, "lr", "crossover"):
        if not _same(now[name], shown[name]):
            diff = difflib.unified_diff(now[name].splitlines(), shown[name].splitlines(), "README.md", "the run",
                                        lineterm="", n=0)
            out.append(f"--- {name}\n" + "\n".join(diff))
    return out


def write_images(out: Path) -> None:
    (run_id,) = [p.stem.removeprefix("metrics_") for p in (out / "logs").glob("metrics_*.jsonl")]
    IMAGES.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "lr_sweep_results" / f"lr_sweep_plot_{run_id}.png", IMAGES / "lr_sweep.png")
    shutil.copyfile(out / "sweet_spot_analysis" / "plots" / f"sweet_spot_emotion_{run_id}.png",
                    IMAGES / "sweet_spot_emotion.png")
    subprocess.run([sys.executable, "-m", "redheart", "plot", str(out), "--dpi", "80",
                    "--out", str(IMAGES / "training_curves.png")], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with README.md instead of rewriting it")
    p.add_argument("--run-dir", type=Path, help="use this run (made by this script) instead of making one")
    p.add_argument("--keep", action="store_true", help="keep the temporary run directory and say where")
    args = p.parse_args(argv)
    readme = README.read_text(encoding="utf-8")
    readme_blocks(readme)  # every block findable before the run
    tmp = None
    out = args.run_dir
    if out is None:
        tmp = Path(tempfile.mkdtemp(prefix="readme_run_"))
        out = tmp / "training"
        make_run(out, readme)
    try:
        shown = render(out)
        if args.check:
            diffs = differences(readme, shown)
            for d in diffs:
                print(d)
            print(f"README.md: {'the examples differ from the run (python docs/make_examples.py rewrites them)' if diffs else 'the examples match the run'}",
                  file=sys.stderr)
            return 1 if diffs else 0
        README.write_text(updated(readme, shown), encoding="utf-8")
        write_images(out)
        print(f"README.md and {IMAGES.relative_to(ROOT)}/ rewritten from the run", file=sys.stderr)
        return 0
    finally:
        if tmp is not None:
            if args.keep:
                print(f"the run: {shlex.quote(str(out))}", file=sys.stderr)
            else:
                shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
