"""The frozen encoder's cost at the start of every run: loading it, tokenizing the corpus and
computing its token states, natively (redheart/model/bert.py) and through transformers.

    python bench/bench_encoder.py --data scruples:PATH --data goemotions:PATH --records 20000

Every process pays the load (each rank of a multi-GPU run, each `predict`); a run on the
public corpus then encodes every text once (the cached features). Prints a table and writes
JSON with the exact command (--out).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redheart.config import preset  # noqa: E402
from redheart.data.importers import load_records  # noqa: E402
from redheart.model.encoder import Encoder, Tokenizer  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(native: bool, texts: list[str], device: torch.device, dtype: torch.dtype, batch: int,
            name: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    tok = Tokenizer(name, max_tokens, native=native)
    enc = Encoder(name, native=native).to(device, dtype)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = tok(texts)
    tokenize = time.perf_counter() - t0
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # as the feature cache encodes: by length
    sync(device)
    t0 = time.perf_counter()
    checksum = 0.0
    for s in range(0, len(order), batch):
        chunk = [ids[i] for i in order[s:s + batch]]
        n = max(map(len, chunk))
        x = torch.tensor([c + [tok.pad_id] * (n - len(c)) for c in chunk]).to(device, non_blocking=True)
        keep = torch.tensor([[True] * len(c) + [False] * (n - len(c)) for c in chunk]).to(device, non_blocking=True)
        with torch.inference_mode():
            out = enc(x, keep)
        checksum += float(out[:, 0].float().sum()) if s == 0 else 0.0
    sync(device)
    encode = time.perf_counter() - t0
    return {"native": native, "load_s": load, "tokenize_s": tokenize, "encode_s": encode,
            "texts_per_s": len(texts) / encode, "tokens": sum(map(len, ids)), "first_batch_checksum": checksum}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=64, help="texts per encoder batch (the feature cache's)")
    ap.add_argument("--repeat", type=int, default=2, help="alternating native / transformers runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = preset("730m")
    records = load_records(args.data)[0][: args.records]
    texts = [r.text for r in records]
    results = []
    for _ in range(args.repeat):
        for native in (True, False):
            r = measure(native, texts, device, dtype, args.batch, cfg.model.encoder, cfg.model.max_tokens)
            print(f"{'native' if native else 'transformers'}: load {r['load_s']:.2f} s, tokenize "
                  f"{r['tokenize_s']:.2f} s, encode {r['encode_s']:.2f} s ({r['texts_per_s']:.0f} texts/s)", flush=True)
            results.append(r)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(["bench/bench_encoder.py"] + sys.argv[1:]),
                                              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                              "torch": torch.__version__, "texts": len(texts), "results": results}, indent=1))
    print(f"\n{len(texts)} texts, {results[0]['tokens']} tokens, {device.type} {str(dtype).replace('torch.', '')}")
    print("| encoder | load s | tokenize s | encode s | texts/s |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {'native' if r['native'] else 'transformers'} | {r['load_s']:.2f} | {r['tokenize_s']:.2f} | "
              f"{r['encode_s']:.2f} | {r['texts_per_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
