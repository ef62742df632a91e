"""Peak GPU memory of the 730m preset's training steps against the trainer's estimate.

    python bench/bench_memory.py --data scruples:PATH --data goemotions:PATH [--records N] --out mem.json

For each configuration (the guide's micro-batch 2 x 32 with CUDA graphs; micro-batch 8 x 8 and
64 x 1 with compiled layers and packed texts; R-Drop on and off) it runs the real Trainer's
optimizer steps on the heaviest steps of the run's first epoch (the steps whose heaviest
micro-batch has the most tokens as the layers process them), records the peak of
`torch.cuda.max_memory_allocated` and what stays allocated between steps, and prints them beside
`memory.estimate` for the same configuration and data (what the trainer decides the swap
manager by). One compiled Trainer serves the four compiled configurations (its micro-batch and
R-Drop are changed between them, as out-of-memory recovery changes the micro-batch), so the
layers are compiled once.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redheart.ckpt.state import RunPaths  # noqa: E402
from redheart.config import preset, set_value  # noqa: E402
from redheart.data.dataset import epoch_plan, micro_batches  # noqa: E402
from redheart.session import build_session  # noqa: E402
from redheart.train import memory  # noqa: E402
from redheart.train.trainer import Trainer  # noqa: E402

GIB = 2**30


def heavy_steps(trainer: Trainer, plan: list[list[int]], micro_batch: int, n: int) -> list[tuple[int, list[int]]]:
    """The `n` steps of `plan` whose heaviest micro-batch costs the most tokens at `micro_batch`."""
    lengths = trainer.train_data.lengths
    cost = []
    for step in plan:
        mbs = micro_batches(step, lengths, micro_batch)
        cost.append((max(trainer.micro.cost(mb) for mb in mbs), step))
    cost.sort(key=lambda c: -c[0])
    return cost[:n]


def measure(trainer: Trainer, steps: list[tuple[int, list[int]]], device: torch.device) -> dict:
    """Run the steps; the peak of each, and what stays allocated between them."""
    peaks, rest = [], []
    for tokens, step in steps:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer.model.train()
        trainer.optimizer_step(trainer.accumulate(step))
        trainer.settle()
        torch.cuda.synchronize(device)
        peaks.append({"tokens": tokens, "peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
                      "towers": trainer._step_heads})
        rest.append(torch.cuda.memory_allocated(device) / GIB)
    return {"steps": peaks, "peak_gib": max(p["peak_gib"] for p in peaks), "at_rest_gib": max(rest),
            "reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--records", type=int, default=0, help="a stable slice of this many records (0: all)")
    p.add_argument("--heavy", type=int, default=3, help="heaviest steps measured per configuration")
    p.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    p.add_argument("--out", default="bench_memory.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_memory.py measures GPU memory: it needs a CUDA GPU")
    device = torch.device("cuda", torch.cuda.current_device())
    base = preset("730m")
    base.data.paths, base.data.max_records, base.train.device = args.data, args.records, "cuda"
    t0 = time.time()
    session = build_session(base.validate())
    print(f"session: {time.time() - t0:.0f}s; train split {len(session.data.splits['train'])} texts", flush=True)
    plan = epoch_plan(session.data.splits["train"].lengths, 64, base.train.seed, 1, 0)
    configs = {  # name: (trainer, micro_batch, R-Drop alpha)
        "c64": ("compiled", 64, 1.0), "c64_nordrop": ("compiled", 64, 0.0),
        "c8": ("compiled", 8, 1.0), "c8_nordrop": ("compiled", 8, 0.0),
        "g2": ("graphs", 2, 1.0), "g2_nordrop": ("graphs", 2, 0.0),
    }
    only = set(filter(None, args.only.split(",")))
    trainer_cfgs = {
        "compiled": {"train.micro_batch": 64, "train.grad_accum": 1, "train.compile": True, "train.packing": "on",
                     "memory.swap": "off"},
        "graphs": {"train.micro_batch": 2, "train.grad_accum": 32, "memory.swap": "off"},
    }
    results = []
    gpu = torch.cuda.get_device_name(device)
    cap = torch.cuda.get_device_properties(device).total_memory / GIB
    for kind, settings in trainer_cfgs.items():
        names = [n for n, c in configs.items() if c[0] == kind and (not only or n in only)]
        if not names:
            continue
        cfg = copy.deepcopy(base)
        for k, v in settings.items():
            set_value(cfg, k, v)
        cfg.validate()
        gc.collect()
        torch.cuda.empty_cache()
        trainer = Trainer(cfg, RunPaths(Path("/tmp/bench_memory"), "bench"), session.data, session.features, device)
        for name in names:
            _, mb, rdrop = configs[name]
            trainer.micro_batch, trainer.cfg.tech.rdrop_alpha = mb, rdrop
            if trainer.micro.graphs is not None:
                trainer.micro.graphs.reset()  # captured with the other R-Drop setting
            est_cfg = copy.deepcopy(cfg)
            est_cfg.train.micro_batch, est_cfg.train.grad_accum, est_cfg.tech.rdrop_alpha = mb, 64 // mb, rdrop
            est = memory.estimate(est_cfg, trainer.param_counts["total"], **trainer.memory_profile)
            t = time.time()
            measure(trainer, [(0, plan[0])], device)  # warm-up: compiling, graph captures, AdamW state
            warm = time.time() - t
            got = measure(trainer, heavy_steps(trainer, plan, mb, args.heavy), device)
            r = {"name": name, "micro_batch": mb, "rdrop": rdrop, "compile": cfg.train.compile,
                 "graphs": trainer.micro.graphs is not None, "packing": trainer.plan.packing, "varlen": trainer.plan.varlen_attention,
                 "estimate": est, "warmup_s": warm, **got, "ratio": est["total_gib"] / got["peak_gib"]}
            results.append(r)
            print(f"{name}: estimate {est['total_gib']:.1f} GiB ({est['tokens']} tokens x {est['layers']} layers), "
                  f"measured peak {got['peak_gib']:.1f} GiB (heaviest steps' micro-batch tokens "
                  f"{[s['tokens'] for s in got['steps']]}), at rest {got['at_rest_gib']:.1f} GiB; "
                  f"estimate/peak {r['ratio']:.3f}", flush=True)
            Path(args.out).write_text(json.dumps({"gpu": gpu, "capacity_gib": cap, "torch": torch.__version__,
                                                  "command": " ".join(sys.argv), "results": results}, indent=2))
        trainer = None
    print(f"\n{gpu}, {cap:.1f} GiB; `python {' '.join(sys.argv)}`")
    print("| configuration | estimate GiB | measured peak GiB | estimate / peak | at rest GiB | tokens (est / heaviest measured) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['estimate']['total_gib']:.1f} | {r['peak_gib']:.1f} | {r['ratio']:.2f} | "
              f"{r['at_rest_gib']:.1f} | {r['estimate']['tokens']} / {max(s['tokens'] for s in r['steps'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
