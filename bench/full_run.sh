#!/usr/bin/env bash
# The full-corpus run of the 730m preset at the fast setting, on the lent GPU, across device
# calls: each call trains until BUDGET seconds (then SIGTERM: the trainer saves a resume state
# and exits 75) and the next call resumes it with --resume latest. The run lives under RUN (on
# the device machine's disk, outside the copied working tree, which a later call may not keep).
#
#   EPOCHS=6 SEED=42 BUDGET=540 RUN=/root/run bash bench/full_run.sh [extra redheart flags]
#
# Needs .carry/encoder.tar.xz (all-MiniLM-L6-v2 in half precision) and .carry/data/ (the
# English corpus from ../shared/data, and its dilemmas dev file if it is to be scored) carried
# with the call. Packs the run's logs, metrics
# record, reports and plots into $OUT/run_files.tgz (when OUT is set); prints the log's end.
set -uo pipefail
EPOCHS="${EPOCHS:-6}"
SEED="${SEED:-42}"
BUDGET="${BUDGET:-540}"
RUN="${RUN:-/root/run}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ ! -f /root/enc/encoder/config.json ]]; then
    mkdir -p /root/enc && tar xJf .carry/encoder.tar.xz -C /root/enc
fi
export REDHEART_ENCODER_DIR=/root/enc/encoder PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
EVAL=()  # the Scruples dilemmas dev file, scored at the end (evaluation only)
if [[ -f .carry/data/scruples_dilemmas_dev.jsonl.gz ]]; then
    EVAL=(--eval-data dilemmas:.carry/data/scruples_dilemmas_dev.jsonl.gz)
fi
RESUME=()
if ls "$RUN"/checkpoints_final/resume_state_*.pt >/dev/null 2>&1; then
    RESUME=(--resume latest)
fi
set -x
timeout -s TERM "$BUDGET" python3 -m redheart unified-train --preset 730m --epochs "$EPOCHS" --seed "$SEED" \
    --batch-size 64 --set train.compile=true --set train.save_every=1 \
    --data scruples:.carry/data/scruples_anecdotes.jsonl.gz --data goemotions:.carry/data/goemotions_en_train.tsv.gz \
    --output-dir "$RUN" "${EVAL[@]}" "${RESUME[@]}" "$@"
code=$?
set +x
echo "exit code $code"
if [[ -n "${OUT:-}" ]]; then  # one archive: a call brings back at most 8 files
    (cd "$RUN" && tar czf "$OUT/run_files.tgz" logs/*.log logs/*.jsonl logs/*.yaml logs/*.png \
        checkpoints_final/*.json checkpoints_final/*.txt sweet_spot_analysis/*.json sweet_spot_analysis/*.txt \
        oom_stats 2>/dev/null)
fi
tail -n 40 "$RUN"/logs/training_*.log 2>/dev/null | cut -c1-400
exit $code
