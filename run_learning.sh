#!/usr/bin/env bash
# Red Heart AI training: mode name -> CLI command, plus the virtual-environment bootstrap.
#
#   bash run_learning.sh MODE [flags]
#
# Modes: unified-test, unified-train, unified-test-v1, train-local, validate (the guide's),
# selftest (the test suite), and any other `redheart` command (predict, info, crossover,
# plot). SAMPLES=N is read by the CLI like --samples N.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${RED_HEART_ENV:-$ROOT/red_heart_env}"
REQS="$ROOT/requirements_venv.txt"
PY="${PYTHON:-python3}"

usage() {
    cat <<'EOF'
usage: bash run_learning.sh MODE [flags]

modes:
  unified-test     quick end-to-end run: LR sweep -> 2 epochs -> Sweet Spot -> Crossover
  unified-train    full training (60 epochs by default), checkpoints, Sweet Spot, Crossover
  unified-test-v1  the quick test on the legacy 800M and 320M presets
  train-local      training on a few samples with memory monitored every step
  validate         integrity check without training (exit 0 only if all is sound)
  selftest         run the test suite (extra arguments go to pytest)
  other            any `redheart` command: info, predict, crossover, plot

common flags: --samples N (or SAMPLES=N)  --epochs N  --batch-size N  --resume PATH|latest
              --preset NAME  --data SPEC  --output-dir DIR  --set key=value  --config FILE
              --debug  --verbose
EOF
}

bootstrap() {
    local stamp="$VENV/.requirements.sha256"
    local want
    want="$(sha256sum "$REQS" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    if [[ -x "$VENV/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    echo "[run_learning] setting up the environment in $VENV (first use; a few minutes)" >&2
    if [[ ! -x "$VENV/bin/python" ]]; then
        "$PY" -m venv "$VENV"
    fi
    # (pip's notes about unreachable extra indexes of some machines are filtered out)
    "$VENV/bin/python" -m pip install --quiet -r "$REQS" 2> >(grep -v "^WARNING: Location" >&2)
    "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT" \
        2> >(grep -v "^WARNING: Location" >&2)
    echo "$want" > "$stamp"
    echo "[run_learning] environment ready" >&2
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    exit 0
fi

MODE="$1"
shift
bootstrap
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT"

case "$MODE" in
    selftest)
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        # exec: the Python process receives SIGTERM/SIGINT itself (timeout, Ctrl-C), so it can
        # stop cleanly with a resumable checkpoint.
        exec "$VENV/bin/python" -m redheart "$MODE" "$@"
        ;;
esac
