"""The guide's plotting script: draws the newest run's training curves under training/.

    python training/plot_training_curves.py [RUN_DIR | --output-dir RUN_DIR] [--run-id ID] [--out PNG] [--dpi N]

RUN_DIR is the --output-dir a training command wrote to (default training/), and may be given
as `--output-dir RUN_DIR` like theirs. Writes `RUN_DIR/logs/training_curves_<run>.png` (9
panels: each head's train and validation curves with its sweet spot, emotion accuracy/F1, the
LR schedule, throughput, memory) and prints {"path": ..., "panels": ...}. A thin wrapper over
`redheart plot`; it re-runs itself in red_heart_env when the current Python lacks the project's
packages.
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
try:
    import torch  # noqa: F401
except ImportError:
    venv_python = ROOT / "red_heart_env" / "bin" / "python"
    if venv_python.exists() and Path(sys.prefix).resolve() != venv_python.parents[1].resolve():
        os.execv(str(venv_python), [str(venv_python), __file__, *sys.argv[1:]])
    raise SystemExit("error: PyTorch is not installed here; run `bash run_learning.sh validate` once to set up red_heart_env")

from redheart.cli import main  # noqa: E402


def plot_argv(args: list[str]) -> list[str]:
    """`redheart plot`'s arguments: `--output-dir DIR` (or `--output-dir=DIR`) becomes the run
    directory; without it or a RUN_DIR first, the repository's training/."""
    rest, run_dir, i = [], None, 0
    while i < len(args):
        if args[i] == "--output-dir" and i + 1 < len(args):
            run_dir, i = args[i + 1], i + 2
            continue
        if args[i].startswith("--output-dir="):
            run_dir = args[i].split("=", 1)[1]
        else:
            rest.append(args[i])
        i += 1
    if run_dir is None and (not rest or rest[0].startswith("-")):
        run_dir = str(ROOT / "training")
    return ["plot", *([run_dir] if run_dir is not None else []), *rest]


if __name__ == "__main__":
    raise SystemExit(main(plot_argv(sys.argv[1:])))
