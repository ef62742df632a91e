"""The heaviest micro-batch a run really meets, against the one the memory estimate assumes.

    python bench/heaviest_seen.py --data scruples:PATH --data goemotions:PATH --epochs 4 --seed 42 \
        [--batch-size 64] [--set train.compile=true] [--peak-gib 44.71]

Tokenizes the run's training split (no model, no GPU), walks its real epoch plans and
micro-batches, and prints the tokens the token-wise layers process for the heaviest of them
(rows x width, packed as the trainer packs, R-Drop's doubled batch) beside
`memory.heaviest_micro_batch`'s figure, and `memory.estimate` at each. With `--peak-gib` (a peak
measured on the GPU for the same run) it also prints the bytes per token and unit of width that
peak implies for one layer, to set against `memory.LAYER_BYTES`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redheart.config import parse_assignment, preset, set_value  # noqa: E402
from redheart.data.dataset import epoch_plan, micro_batches  # noqa: E402
from redheart.data.pipeline import prepare_data  # noqa: E402
from redheart.model.encoder import Tokenizer  # noqa: E402
from redheart.model.modules import count_parameters  # noqa: E402
from redheart.model.network import RedHeartNet  # noqa: E402
from redheart.train import memory  # noqa: E402
from redheart.train.step import micro_batch_tokens  # noqa: E402

GIB = 2**30


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--preset", default="730m")
    p.add_argument("--batch-size", type=int, default=64, help="micro-batch (accumulation 1)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--peak-gib", type=float, default=0.0, help="the peak measured on the GPU for this run")
    args = p.parse_args()
    cfg = preset(args.preset)
    cfg.data.paths, cfg.train.seed = args.data, args.seed
    cfg.train.micro_batch, cfg.train.grad_accum = args.batch_size, max(1, 64 // args.batch_size)
    for item in args.set:
        set_value(cfg, *parse_assignment(item))
    cfg.validate()
    data = prepare_data(cfg, Tokenizer(cfg.model.encoder, cfg.model.max_tokens))
    train = data.splits["train"]
    lengths = train.lengths
    packed = cfg.train.packing == "on" or (cfg.train.packing == "auto" and cfg.train.micro_batch > 8)
    rdrop = cfg.tech.rdrop_alpha > 0
    seen, worst = 0, None
    for epoch in range(1, args.epochs + 1):
        for step in epoch_plan(lengths, cfg.effective_batch, cfg.train.seed, epoch, cfg.data.length_group_steps):
            for mb in micro_batches(step, lengths, cfg.train.micro_batch, cfg.train.micro_batch_tokens):
                lens = [int(lengths[i]) for i in mb]
                tokens = micro_batch_tokens(lens, rdrop, max(lens), packed)
                if tokens > seen:
                    seen, worst = tokens, (epoch, len(mb), sum(lens), max(lens))
    assumed = memory.heaviest_micro_batch(lengths.tolist(), cfg.train.micro_batch, cfg.model.max_tokens, packed)
    assumed *= 2 if rdrop else 1
    heads = sum(1 for h in ("emotion", "bentham", "regret", "surd") if bool(getattr(train, f"{h}_mask").any()))
    params = count_parameters(RedHeartNet(cfg.model))["total"]
    one = 2 if rdrop else 1
    est_seen = memory.estimate(cfg, params, tokens=seen // one, heads=heads)
    est_assumed = memory.estimate(cfg, params, tokens=assumed // one, heads=heads)
    out = {"preset": cfg.preset, "micro_batch": cfg.train.micro_batch, "packed": packed, "rdrop": rdrop,
           "compiled": cfg.train.compile, "epochs": args.epochs, "train_texts": len(lengths),
           "heaviest_seen_tokens": seen, "heaviest_seen": {"epoch": worst[0], "texts": worst[1], "text_tokens": worst[2],
                                                           "longest": worst[3]},
           "heaviest_assumed_tokens": assumed, "estimate_at_seen_gib": est_seen["total_gib"],
           "estimate_at_assumed_gib": est_assumed["total_gib"], "layers": est_seen["layers"]}
    if args.peak_gib:
        fixed = est_seen["total_gib"] - est_seen["activations_gib"]
        backward = seen * cfg.model.hidden * memory.BACKWARD_BYTES * cfg.model.ffn_mult / 4 / GIB
        act = args.peak_gib - fixed - backward
        out["peak_gib"] = args.peak_gib
        out["layer_bytes_implied"] = act * GIB / (est_seen["layers"] * seen * cfg.model.hidden)
    print(json.dumps(out, indent=2))
    print(f"\nheaviest micro-batch: seen {seen} tokens, assumed {assumed}; estimate {est_seen['total_gib']:.1f} GiB "
          f"at the seen one, {est_assumed['total_gib']:.1f} at the assumed one"
          + (f"; measured peak {args.peak_gib:.1f} GiB implies {out['layer_bytes_implied']:.1f} bytes a token-layer "
             f"per unit of width (LAYER_BYTES: {memory.LAYER_BYTES})" if args.peak_gib else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
