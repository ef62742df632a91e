"""The guide's plotting script: draws the newest run's training curves under training/.

    python training/plot_training_curves.py [RUN_DIR] [--run-id ID] [--out PNG] [--dpi N]

Writes `RUN_DIR/logs/training_curves_<run>.png` (9 panels: each head's train and validation
curves with its sweet spot, emotion accuracy/F1, the LR schedule, throughput, memory) and
prints {"path": ..., "panels": ...}. A thin wrapper over `redheart plot`; it re-runs itself
in red_heart_env when the current Python lacks the project's packages.
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

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0].startswith("-"):
        args = [str(ROOT / "training"), *args]
    raise SystemExit(main(["plot", *args]))
