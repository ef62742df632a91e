"""What each technique buys: the same run with label smoothing, R-Drop and EMA on and off.

    python bench/techniques_table.py --data scruples:../shared/data/scruples_anecdotes.jsonl.gz \
        --data ../shared/data/goemotions_en_train.tsv.gz --records 2000 --epochs 6 --preset tiny

Same seed, data, epochs and LR for every configuration; prints the final validation metrics
(raw weights, and the EMA weights where EMA is on) as a Markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redheart.ckpt import io as ckio  # noqa: E402
from redheart.ckpt.state import read_registry  # noqa: E402
from redheart.config import preset, set_value  # noqa: E402
from redheart.run import RunOptions, train  # noqa: E402

CONFIGS = {
    "all on": {},
    "label smoothing off": {"tech.label_smoothing": 0.0},
    "R-Drop off": {"tech.rdrop_alpha": 0.0},
    "EMA off": {"tech.ema_decay": 0.0},
    "all off": {"tech.label_smoothing": 0.0, "tech.rdrop_alpha": 0.0, "tech.ema_decay": 0.0},
}
KEYS = ("loss", "emotion_acc", "emotion_f1", "bentham_mae", "regret_mae", "regret_r")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--out", default="techniques_table.json")
    args = p.parse_args()
    rows = {}
    for name, changes in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            cfg = preset(args.preset)
            cfg.output_dir = tmp
            cfg.data.paths, cfg.data.max_records, cfg.train.epochs = args.data, args.records, args.epochs
            cfg.train.log_every = 10_000
            cfg.sweep.enabled = False  # one LR for every configuration
            for k, v in changes.items():
                set_value(cfg, k, v)
            for a in args.set:
                k, v = a.split("=", 1)
                set_value(cfg, k, float(v) if v.replace(".", "", 1).replace("e-", "", 1).isdigit() else v)
            code = train(cfg.validate(), RunOptions(analysis=False))
            entry = read_registry(Path(tmp))[-1]
            state = ckio.load(entry["path"], entry["sha256"])
        last = state["history"][-1]
        rows[name] = {"code": code, "val": last["val"], "val_ema": last["val_ema"], "train": last["train"]}
        print(f"{name}: val loss {last['val']['loss']:.4f}", flush=True)
    Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2))
    print("\n| configuration | weights | " + " | ".join(KEYS) + " |")
    print("|---|---|" + "---|" * len(KEYS))
    for name, r in rows.items():
        for label, block in (("raw", r["val"]), ("EMA", r["val_ema"])):
            if block:
                print(f"| {name} | {label} | " + " | ".join(f"{block.get(k, float('nan')):.4f}" for k in KEYS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
