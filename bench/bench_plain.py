"""The plain-PyTorch limit: a carefully written training step of a network of the same shape as
the Red Heart model, with none of the trainer, measured on the same machine as bench_train.py.

    python bench/bench_plain.py --variant eager64:micro_batch=64 --variant comp64:micro_batch=64,compile=true \
        --variant comp128:micro_batch=128,compile=true --variant guide:micro_batch=2,grad_accum=32

This is the reference the performance issue quotes (hidden 1280, 18 + 4 x 4 Transformer
layers, every text 256 tokens, bf16 autocast, fused AdamW, SDPA, optionally `torch.compile` of
the whole model): `nn.TransformerEncoderLayer` (pre-norm, GELU, dropout) for every layer, four
towers with attention pooling and an output MLP, random encoder states in, random targets. No
encoder, EMA, R-Drop, label smoothing, gradient clipping, packing or metrics; no host read in
the step. Its FLOPs are counted with the trainer's formula (`redheart/train/flops.py`) and its
MFU against a bf16 matrix-product peak measured in the same run, so its figures compare with
bench_train.py's (`bench_train.py --min-tokens 256` gives the trainer the same fixed-length work).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redheart.config import ModelConfig, preset  # noqa: E402
from redheart.model.network import HEAD_SIZES  # noqa: E402
from redheart.train.flops import measure_peak_tflops, train_flops  # noqa: E402


def encoder_layers(cfg: ModelConfig, n: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, cfg.ffn_mult * cfg.hidden, cfg.dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, n, enable_nested_tensor=False)


class Tower(nn.Module):
    def __init__(self, cfg: ModelConfig, out: int):
        super().__init__()
        self.layers = encoder_layers(cfg, cfg.tower_layers)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.pool = nn.Linear(cfg.hidden, 1, bias=False)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden, cfg.tower_mlp), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.tower_mlp, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.layers(x))
        weights = torch.softmax(self.pool(x).squeeze(-1).float(), dim=-1).to(x.dtype)
        return self.mlp(torch.einsum("bn,bnh->bh", weights, x))


class PlainNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.encoder_dim, cfg.hidden)
        self.backbone = encoder_layers(cfg, cfg.layers)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.towers = nn.ModuleDict({name: Tower(cfg, size) for name, size in HEAD_SIZES.items()})

    def forward(self, states: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.norm(self.backbone(self.proj(states)))
        return {name: tower(x) for name, tower in self.towers.items()}


def loss_fn(out: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
    return (F.cross_entropy(out["emotion"].float(), t["emotion"])
            + F.mse_loss(torch.sigmoid(out["bentham"].float()), t["bentham"])
            + F.mse_loss(torch.sigmoid(out["regret"].float()).squeeze(-1), t["regret"])
            + F.cross_entropy(out["surd"].float(), t["surd"]))


def batch(cfg: ModelConfig, n: int, tokens: int, device: torch.device, g: torch.Generator) -> tuple:
    states = torch.randn(n, tokens, cfg.encoder_dim, generator=g).to(device)
    targets = {"emotion": torch.randint(0, HEAD_SIZES["emotion"], (n,), generator=g).to(device),
               "bentham": torch.rand(n, HEAD_SIZES["bentham"], generator=g).to(device),
               "regret": torch.rand(n, generator=g).to(device),
               "surd": torch.softmax(torch.randn(n, HEAD_SIZES["surd"], generator=g), -1).to(device)}
    return states, targets


def run_variant(cfg: ModelConfig, opts: dict[str, str], args, device: torch.device, peak: float) -> dict:
    mb, accum = int(opts.get("micro_batch", 64)), int(opts.get("grad_accum", 1))
    n_warm, n_steps = int(opts.get("warmup", args.warmup)), int(opts.get("steps", args.steps))
    compiled = opts.get("compile", "false").lower() in ("1", "true", "on")
    torch.manual_seed(0)
    model = PlainNet(cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(0)
    micro = [batch(cfg, mb, args.tokens, device, g) for _ in range(accum)]  # made once: no input pipeline
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def step() -> torch.Tensor:
        for states, targets in micro:
            with torch.autocast(device.type, dtype, enabled=device.type == "cuda"):
                loss = loss_fn(fwd(states), targets) / accum
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_begin = time.perf_counter()
    losses = [step() for _ in range(n_warm)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    losses += [step() for _ in range(n_steps)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    samples = mb * accum * n_steps
    flops = train_flops(cfg, [args.tokens] * mb * accum, rdrop=False, encoder_runs=False) * n_steps
    return {"micro_batch": mb, "grad_accum": accum, "compile": compiled, "tokens": args.tokens,
            "params": sum(p.numel() for p in model.parameters()),
            "samples_per_s": samples / seconds, "tokens_per_s": samples * args.tokens / seconds,
            "tflops": flops / seconds / 1e12, "mfu": flops / seconds / 1e12 / peak, "step_s": seconds / n_steps,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
            "warmup_s": t0 - t_begin, "losses": [float(x) for x in losses]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="730m", help="the model shape (the trainer's presets)")
    p.add_argument("--tokens", type=int, default=256, help="tokens of every text")
    p.add_argument("--variant", action="append", required=True,
                   help="name:micro_batch=N,grad_accum=K,compile=true|false[,warmup=W,steps=S]")
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--out", default="bench_plain.json")
    args = p.parse_args()
    cfg = preset(args.preset).model
    if args.tokens > cfg.max_tokens:
        raise SystemExit(f"--tokens {args.tokens}: the {args.preset} preset reads at most {cfg.max_tokens} tokens")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda":
        print("no GPU: a smoke run of the benchmark code (the figures mean nothing here)")
    peak = measure_peak_tflops(device) if device.type == "cuda" else float("nan")
    print(f"measured bf16 matrix peak: {peak:.0f} TFLOP/s", flush=True)
    results = []
    for spec in args.variant:
        name, _, rest = spec.partition(":")
        opts = dict(item.split("=", 1) for item in filter(None, rest.split(",")))
        try:
            r = {"name": name, **run_variant(cfg, opts, args, device, peak)}
        except torch.OutOfMemoryError as exc:
            r = {"name": name, "error": f"out of memory: {str(exc).splitlines()[0][:200]}"}
        results.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if "error" in r:
            print(f"{name}: FAILED: {r['error']}", flush=True)
        else:
            print(f"{name}: {r['samples_per_s']:.1f} samples/s, MFU {r['mfu']:.1%}, step {r['step_s']:.3f}s, "
                  f"peak {r['peak_gib']:.1f} GiB, {r['params'] / 1e6:.0f}M parameters, warm-up {r['warmup_s']:.1f}s",
                  flush=True)
        doc = {"peak_tflops": peak, "preset": args.preset, "tokens": args.tokens, "torch": torch.__version__,
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "command": " ".join(sys.argv), "results": results}
        Path(args.out).write_text(json.dumps(doc, indent=1))  # after every variant: a cut-off call keeps the others
    print("\n| variant | samples/s | tokens/s | MFU | step s | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error'][:60]} | | | | |")
        else:
            print(f"| {r['name']} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['mfu']:.1%} | "
                  f"{r['step_s']:.3f} | {r['peak_gib']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
