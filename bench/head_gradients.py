"""Each head's share of the gradient at the backbone's weights (redheart/train/diagnostics.py),
averaged over batches of the training split, for a checkpoint or for a preset's initial weights.

    python bench/head_gradients.py --checkpoint training/checkpoints_final/crossover_final.pth --data SPEC ...
    python bench/head_gradients.py --preset 730m --data SPEC ... --batches 4 --batch-size 8   # at initialisation

Prints one JSON object (per-batch and mean norms, shares and cosines) and a table last.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redheart.config import HEADS, parse_assignment, preset, set_value  # noqa: E402
from redheart.data.dataset import TaskData, split_records  # noqa: E402
from redheart.data.features import FeatureSource  # noqa: E402
from redheart.data.importers import load_data  # noqa: E402
from redheart.ckpt.rebuild import model_from_checkpoint  # noqa: E402
from redheart.model.encoder import Encoder, Tokenizer  # noqa: E402
from redheart.model.network import RedHeartNet  # noqa: E402
from redheart.train.diagnostics import head_gradients  # noqa: E402
from redheart.train.plan import amp_dtype  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", help="a checkpoint (default: the preset's initial weights)")
    p.add_argument("--preset", default="730m")
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--records", type=int, default=4000, help="a random sample of this many training records")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--set", action="append", default=[], help="a config value for the loss, e.g. tech.value_loss=mse")
    p.add_argument("--out", default="")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.checkpoint:
        model, cfg, _ = model_from_checkpoint(args.checkpoint, device)
    else:
        cfg = preset(args.preset)
        torch.manual_seed(cfg.train.seed)
        with device:
            model = RedHeartNet(cfg.model)
    for a in args.set:
        set_value(cfg, *parse_assignment(a))
    dtype = amp_dtype(cfg, device)
    records = split_records(load_data(args.data, skip_bad=False).records, cfg.data.train_frac,
                            cfg.data.val_frac)["train"]
    rng = random.Random(args.seed)
    records = rng.sample(records, min(args.records, len(records)))
    tokenizer = Tokenizer(cfg.model.encoder, cfg.model.max_tokens)
    data = TaskData(records, tokenizer([r.text for r in records]))
    source = FeatureSource(Encoder.of(cfg.model).to(device), data, device, dtype or torch.float32,
                           tokenizer.pad_id, cache=False)
    rows = []
    for b in range(args.batches):
        idx = rng.sample(range(len(data)), min(args.batch_size, len(data)))
        states, batch = source(idx)
        tgt = {k: v.to(device) for k, v in batch.targets.items()}
        t = time.time()
        got = head_gradients(model, states, batch.keep.to(device), tgt, data.head_counts(idx),
                             cfg.train.head_weights, cfg.tech, dtype)
        rows.append(got)
        print(f"batch {b}: " + ", ".join(f"{h} {s:.3f}" for h, s in got["share"].items())
              + f" ({time.time() - t:.1f}s)", flush=True)
    heads = [h for h in HEADS if any(h in r["norm"] for r in rows)]
    mean = {k: {h: sum(r[k][h] for r in rows if h in r[k]) / max(1, sum(h in r[k] for r in rows)) for h in heads}
            for k in ("norm", "share")}
    pairs = sorted({c for r in rows for c in r["cosine"]})
    mean["cosine"] = {c: sum(r["cosine"][c] for r in rows if c in r["cosine"]) / sum(c in r["cosine"] for r in rows)
                      for c in pairs}
    doc = {"checkpoint": args.checkpoint, "preset": cfg.preset, "device": str(device), "command": " ".join(sys.argv),
           "batches": rows, "mean": mean}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc["mean"]))
    print(f"\n`python {' '.join(sys.argv)}` ({cfg.preset}, {device}, {len(rows)} batches of {args.batch_size})")
    print("| head | gradient norm at the backbone | share |")
    print("|---|---|---|")
    for h in heads:
        print(f"| {h} | {mean['norm'][h]:.4g} | {mean['share'][h]:.3f} |")
    print("| cosines | " + ", ".join(f"{c} {v:+.3f}" for c, v in mean["cosine"].items()) + " | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
