"""Scaling over several GPUs of one host: the same `unified-train` run on 1, 2, 4 GPUs.

    export REDHEART_ENCODER_DIR=$PWD/.carry/encoder
    python bench/bench_scaling.py --gpus 1 2 4 --records 3200 \
        --data scruples:.carry/data/scruples_anecdotes.jsonl.gz \
        --data goemotions:.carry/data/goemotions_en_train.tsv.gz --out /tmp/scaling.json

Each run is the real trainer (`python -m redheart unified-train --preset 730m`, launched under
torchrun for N > 1) for two epochs; the figures are the trainer's own for epoch 2 (epoch 1
includes CUDA-graph capture and compilation): samples/s over the epoch's training time (the
validation pass and the checkpoint writes are not in it). Scaling efficiency = samples/s on N
GPUs / (N x samples/s on one). The effective batch is the same (64) on every N.

With `--profile-step K` every rank profiles global step K (`train.profile_step`) and the table
ends with each rank's step: its wall time, how busy its GPU was, its kernels by kind
(communication included), and what a micro-batch of each size took on the GPU. The profiled
step is slower than the others and counts in its epoch's rate: take the rates from runs
without it.
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redheart.train.profile import micro_batch_lines  # noqa: E402


def one_run(n: int, args) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "redheart", "unified-train", "--preset", args.preset, "--epochs", "2",
               "--no-lr-sweep", "--set", "crossover.enabled=false", "--max-records", str(args.records),
               "--output-dir", out]
        for d in args.data:
            cmd += ["--data", d]
        for s in args.set:
            cmd += ["--set", s]
        if args.profile_step:  # every rank profiles this step: where a rank's time goes beside the others'
            cmd += ["--set", f"train.profile_step={args.profile_step}"]
        if n > 1:
            cmd += ["--gpus", str(n)]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
        wall = time.time() - t0
        if proc.returncode != 0:
            return {"gpus": n, "error": proc.stderr[-2000:], "wall_s": wall, "command": " ".join(cmd)}
        rec = [json.loads(line) for f in Path(out, "logs").glob("metrics_*.jsonl") for line in f.open()]
        last = rec[-1]
        found = sorted(f for f in Path(out, "logs").glob("profile_step*_rank*.json") if not f.name.endswith(".trace.json"))
        profiles = {f.stem: json.loads(f.read_text()) for f in found}
        if args.keep_traces:  # the Chrome traces, gzipped, for a look at the timeline
            Path(args.keep_traces).mkdir(parents=True, exist_ok=True)
            for f in Path(out, "logs").glob("profile_step*_rank*.trace.json"):
                dest = Path(args.keep_traces, f"{n}gpu_{f.name}.gz")
                dest.write_bytes(gzip.compress(f.read_bytes()))
        return {"gpus": n, "samples_per_s": last["samples_per_s"], "tokens_per_s": last["tokens_per_s"],
                "epoch_s": last["seconds"], "epoch1_s": rec[0]["seconds"], "samples": last["samples"],
                "peak_gib": last["memory"].get("peak_gib"), "val_loss": last["val"]["loss"], "wall_s": wall,
                "command": " ".join(cmd),
                "profiles": {k: {m: v for m, v in p.items() if m != "trace"} for k, p in profiles.items()}}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--records", type=int, default=3200)
    p.add_argument("--preset", default="730m")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--timeout", type=int, default=420)
    p.add_argument("--profile-step", type=int, default=0,
                   help="profile this global step on every rank (choose one in epoch 2: past compiling and capture)")
    p.add_argument("--keep-traces", default="", help="with --profile-step: copy every rank's Chrome trace (gzipped) here")
    p.add_argument("--out", default="scaling.json")
    args = p.parse_args()
    rows = []
    for n in args.gpus:
        rows.append(one_run(n, args))
        Path(args.out).write_text(json.dumps({"settings": vars(args), "runs": rows}, indent=2))
        print(json.dumps(rows[-1])[:600], flush=True)
    base = next((r["samples_per_s"] for r in rows if r["gpus"] == 1 and "samples_per_s" in r), None)
    print(f"\n{args.preset}, effective batch 64, {' '.join('--set ' + s for s in args.set) or 'default config'}")
    print(f"{'GPUs':>4} {'samples/s':>10} {'tokens/s':>10} {'epoch s':>8} {'peak GiB':>9} {'efficiency':>11}")
    for r in rows:
        if "samples_per_s" not in r:
            print(f"{r['gpus']:>4} failed: {r['error'][-300:]}")
            continue
        eff = f"{r['samples_per_s'] / (r['gpus'] * base):.1%}" if base else "- (no 1-GPU run)"
        print(f"{r['gpus']:>4} {r['samples_per_s']:>10.1f} {r['tokens_per_s']:>10.0f} {r['epoch_s']:>8.1f} "
              f"{(r['peak_gib'] or 0):>9.1f} {eff:>11}")
    for r in rows:  # --profile-step: each rank's profiled step
        for name, p in r.get("profiles", {}).items():
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in p["by_kind_ms"].items())
            waits = ", ".join(f"{w['ms']:.1f} ms in {w['op']}" for w in p.get("host_waits", []))
            comm = (f"; communication {p['communication_ms']:.1f} ms, {p['communication_overlapped_ms']:.1f} "
                    f"beside other kernels" if p.get("communication_ms") else "")
            print(f"{r['gpus']} GPUs, {name}: {p['wall_ms']:.1f} ms, GPU busy {p['busy']:.0%}, "
                  f"kernels {p['kernel_ms']:.1f} ms ({kinds}){comm}; host waited: {waits or 'never'}")
            for line in micro_batch_lines(p):  # what a micro-batch of each size took
                print("    " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
