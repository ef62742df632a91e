"""Training-step throughput of the Red Heart trainer on one GPU, on real text lengths.

    python bench/bench_train.py --data scruples:PATH --data goemotions:PATH --records 2400 \
        --variant guide:micro_batch=2,grad_accum=32 --variant fast:micro_batch=64,grad_accum=1 ...

Each variant is `name:key=value,...` over train.* / tech.* / model.* fields (short names:
micro_batch, grad_accum, rdrop, compile, checkpointing, cuda_graphs, packing, ...; `inductor.NAME=value` sets
a torch._inductor.config field for that variant). For each it runs warm-up
optimizer steps, then times `--steps` optimizer steps with the real Trainer (same code as
training) and prints samples/s, real (non-padding) tokens/s, MFU against a bf16 matrix-product
peak measured in the same run, peak memory and step time. Results go to --out as JSON.

A curve longer than one call allows (the 100 capped steps of the memory issue): with
`--state-dir DIR --checkpoint-after SECONDS` (or `save_at=K` in a variant) a variant saves the
trainer's exact resume state and stops; the same command run again continues from it, with
the same data order, dropout streams and optimizer state as one uninterrupted run.

With `--profile DIR`, one more optimizer step of each variant runs under torch.profiler: the
GPU kernels' time by kind (matrix products, attention, element-wise, casts and copies,
normalisation and reductions, optimizer, communication), the share of the step's wall time the
GPU was busy, kernel counts and the costliest kernels go into the results (and a Chrome trace
into DIR): what limits a configuration, measured rather than guessed.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redheart.ckpt import io as ckio  # noqa: E402
from redheart.ckpt.state import RunPaths  # noqa: E402
from redheart.config import HEADS, preset, set_value  # noqa: E402
from redheart.data.dataset import epoch_plan, micro_batches  # noqa: E402
from redheart.model.packing import padded_fraction  # noqa: E402
from redheart.session import build_session  # noqa: E402
from redheart.train.flops import measure_peak_tflops, train_flops  # noqa: E402
from redheart.train.profile import micro_batch_lines, profiled  # noqa: E402
from redheart.train.step import towers_run  # noqa: E402
from redheart.train.trainer import Trainer  # noqa: E402

SHORT = {"micro_batch": "train.micro_batch", "grad_accum": "train.grad_accum", "rdrop": "tech.rdrop_alpha",
         "compile": "train.compile", "checkpointing": "model.activation_checkpointing",
         "ema": "tech.ema_decay", "swap": "memory.swap", "cuda_graphs": "train.cuda_graphs",
         "length_group": "data.length_group_steps", "micro_batch_tokens": "train.micro_batch_tokens",
         "bf16_weights": "train.bf16_weights", "packing": "train.packing", "attention": "train.packed_attention",
         "wrapper": "train.compile_wrapper"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, rest = text.partition(":")
    pairs = {}
    for item in filter(None, rest.split(",")):
        k, v = item.split("=", 1)
        pairs[SHORT.get(k, k)] = v
    return name, pairs


def profile_step(trainer: Trainer, step: list[int], device: torch.device, trace: Path) -> dict:
    """One optimizer step under torch.profiler: where the GPU time goes and how busy the GPU was."""
    with trainer.micro.annotating(), profiled(device, trace) as summary:  # with each micro-batch's GPU time
        trainer.model.train()
        trainer.optimizer_step(trainer.accumulate(step))
    return summary


def token_share(steps: list[list[int]], lengths: torch.Tensor, trainer: Trainer) -> float:
    """Real tokens over the tokens the layers compute (padded, or packed rows) in these steps."""
    real = computed = 0
    for step in steps:
        for mb in micro_batches(step, lengths, trainer.batches.size, trainer.batches.tokens):
            lens = [int(lengths[i]) for i in mb]
            n_real, padded, packed = padded_fraction(lens)
            real += n_real
            computed += packed if trainer.plan.packing else padded
    return real / computed


def write_results(args: argparse.Namespace, peak: float, device: torch.device, results: list[dict]) -> None:
    doc = {"peak_tflops": peak, "preset": args.preset, "records": args.records,
           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "command": " ".join(sys.argv), "results": results}
    Path(args.out).write_text(json.dumps(doc, indent=2))


def set_inductor(settings: dict) -> dict:
    """Set torch._inductor.config fields ("true", "8", "name" parsed as JSON where they parse) and
    forget compiled code, so the next compile sees them; returns the previous values."""
    import torch._dynamo
    import torch._inductor.config as ic

    previous = {k: getattr(ic, k) for k in settings}
    for k, v in settings.items():
        try:
            v = json.loads(v) if isinstance(v, str) else v
        except ValueError:
            pass
        setattr(ic, k, v)
    torch._dynamo.reset()
    return previous


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="730m")
    p.add_argument("--data", action="append", required=True)
    p.add_argument("--records", type=int, default=2400)
    p.add_argument("--min-tokens", type=int, default=0,
                   help="train only on texts of at least this many encoder tokens (--min-tokens 256: every "
                   "text at the 256-token limit, the fixed-length work of bench_plain.py)")
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--memory-cap-gib", type=float, default=0, help="limit this process's GPU memory")
    p.add_argument("--out", default="bench_train.json")
    p.add_argument("--profile", default="", help="profile one extra step per variant; traces go to this folder")
    p.add_argument("--state-dir", default="", help="with --checkpoint-after: where a variant's training state "
                   "goes; a variant whose state is there continues from it (a long curve over several calls)")
    p.add_argument("--checkpoint-after", type=float, default=0,
                   help="seconds after which a variant saves its state to --state-dir and stops")
    p.add_argument("--stream", default="", help="append every step's loss to this JSON-lines file "
                   "(a read per step: for loss curves, not for timings)")
    args = p.parse_args()

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda":
        print("no GPU: a smoke run of the benchmark code (the figures mean nothing here)")
    peak = measure_peak_tflops(device) if device.type == "cuda" else float("nan")
    print(f"measured bf16 matrix peak: {peak:.0f} TFLOP/s", flush=True)
    base = preset(args.preset)
    base.data.paths, base.data.max_records = args.data, args.records
    base.train.device = device.type
    session = build_session(base.validate())
    lengths = session.data.splits["train"].lengths
    usable = torch.nonzero(lengths >= args.min_tokens).squeeze(1)  # split indices the steps draw from
    if len(usable) == 0:
        raise SystemExit(f"--min-tokens {args.min_tokens}: no training text is that long "
                         f"(the longest has {int(lengths.max())} tokens)")
    print(f"train split: {len(lengths)} texts, mean {float(lengths.float().mean()):.0f} tokens, "
          f"max {int(lengths.max())}" + (f"; {len(usable)} of at least {args.min_tokens} tokens used, mean "
          f"{float(lengths[usable].float().mean()):.0f}" if args.min_tokens else ""), flush=True)
    results = []
    for spec in args.variant:
        name, pairs = parse_variant(spec)
        cap = float(pairs.pop("cap", args.memory_cap_gib))  # per-variant GPU memory cap in GiB (0 = none)
        n_warm, n_steps = int(pairs.pop("warmup", args.warmup)), int(pairs.pop("steps", args.steps))
        save_at = int(pairs.pop("save_at", 0))  # with --state-dir: save and stop after this step
        # Inductor settings for this variant only, e.g. inductor.fallback_random=true
        inductor = {k.split(".", 1)[1]: pairs.pop(k) for k in list(pairs) if k.startswith("inductor.")}
        cfg = preset(args.preset)
        cfg.data.paths, cfg.data.max_records, cfg.train.device = args.data, args.records, device.type
        for k, v in pairs.items():
            set_value(cfg, k, v)
        cfg.validate()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total) if cap else 1.0, device)
        trainer = Trainer(cfg, RunPaths(Path("/tmp/bench_run"), "bench"), session.data, session.features, device)
        # after the Trainer (whose compile_blocks sets its own defaults), before the first compile
        restore_inductor = set_inductor(inductor) if inductor or cfg.train.compile else {}
        plan = epoch_plan(lengths[usable], cfg.effective_batch, cfg.train.seed, 1, cfg.data.length_group_steps)
        steps = [usable[plan[i % len(plan)]].tolist() for i in range(n_warm + n_steps)]
        losses, start, stopped = [], 0, False
        state_file = Path(args.state_dir) / f"{name}.pt" if args.state_dir else None
        if state_file is not None and state_file.exists():  # continue exactly where the last call stopped
            saved = ckio.load(state_file)
            trainer.restore(saved)
            start, losses = int(saved["bench_step"]), list(saved["bench_losses"])
            print(f"{name}: continuing from step {start} ({state_file})", flush=True)
        t_begin = time.perf_counter()
        t0 = t_begin
        graphs_before = 0
        try:
            for i in range(start, len(steps)):
                if i == max(n_warm, start):
                    sync(device)
                    t0 = time.perf_counter()
                    graphs_before = len(trainer.micro.graphs.graphs) if trainer.micro.graphs is not None else 0
                trainer.model.train()
                parts = trainer.accumulate(steps[i])
                trainer.optimizer_step(parts)
                losses.append(parts["loss"])
                if args.stream:
                    with open(args.stream, "a") as f:
                        f.write(json.dumps({"variant": name, "step": i, "loss": float(parts["loss"]),
                                            "t": time.perf_counter()}) + "\n")
                late = args.checkpoint_after and time.perf_counter() - t_begin > args.checkpoint_after
                if state_file is not None and i + 1 < len(steps) and (late or i + 1 == save_at):
                    ckio.atomic_save({**trainer.resume_state(), "bench_step": i + 1,
                                      "bench_losses": [float(x) for x in losses]}, state_file)
                    print(f"{name}: stopped after step {i + 1} of {len(steps)}; state in {state_file}: "
                          f"run the same command again to continue", flush=True)
                    stopped = True
                    break
            sync(device)
            seconds = time.perf_counter() - t0
        except Exception as exc:  # one failing variant must not lose the others' figures
            print(f"{name}: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
            results.append({"name": name, "config": pairs, "error": f"{type(exc).__name__}: {exc}"[:500]})
            trainer = None  # its memory freed before the next variant
            set_inductor(restore_inductor)
            continue
        if stopped:
            results.append({"name": name, "config": pairs, "stopped_at": len(losses),
                            "losses": [float(x) for x in losses]})
            trainer = None  # its memory freed before the next variant
            set_inductor(restore_inductor)
            continue
        if state_file is not None and state_file.exists():
            state_file.unlink()  # done: the next call starts afresh
        timed = steps[max(n_warm, start):]
        # an epoch's last step is short: with compiled layers, a new shape to compile inside the window
        short = sum(len(s) < cfg.effective_batch for s in timed)
        if short:
            print(f"{name}: note: {short} timed step(s) smaller than the effective batch (an epoch's last "
                  f"step): with compiled layers a recompile may fall inside the timing", flush=True)
        samples = sum(len(s) for s in timed)
        toks = sum(int(lengths[s].sum()) for s in timed)
        rdrop = cfg.tech.rdrop_alpha > 0
        trained = [towers_run(trainer.train_data.head_counts(s)) for s in timed]
        flops = sum(train_flops(cfg.model, lengths[s].tolist(), rdrop, not session.features["train"].cached, heads)
                    for s, heads in zip(timed, trained))
        r = {"name": name, "config": pairs, "samples_per_s": samples / seconds, "tokens_per_s": toks / seconds,
             "tflops": flops / seconds / 1e12, "mfu": flops / seconds / 1e12 / peak,
             "step_s": seconds / len(timed),
             "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
             "micro_batch_final": trainer.micro_batch, "losses": [float(x) for x in losses],
             "swap": trainer.swap, "checkpointing": trainer.checkpointing, "graphs": trainer.micro.graphs is not None,
             "packing": trainer.plan.packing, "real_token_share": token_share(timed, lengths, trainer), "cap_gib": cap,
             # CUDA graphs captured while timing (each a few extra passes inside the timed steps)
             "graphs_captured_timed": (len(trainer.micro.graphs.graphs) - graphs_before) if trainer.micro.graphs is not None else 0,
             "short_steps_timed": short,
             "towers_run": sorted({h for heads in trained for h in (heads or HEADS)}),  # in some timed step
             "warmup_s": t0 - t_begin}  # the warm-up steps' wall time, compiling included
        if inductor:
            r["inductor"] = inductor
        if args.profile:
            r["profile"] = profile_step(trainer, steps[-1], device, Path(args.profile) / f"{name}.json")
            prof = r["profile"]
            print(f"{name}: profile: step {prof['wall_ms']:.0f} ms, GPU busy {prof['busy']:.0%}, "
                  f"{prof['kernels']} kernels; " + ", ".join(f"{k} {v:.0f} ms" for k, v in prof["by_kind_ms"].items()),
                  flush=True)
            for line in micro_batch_lines(prof):
                print(f"{name}:   {line}", flush=True)
        results.append(r)
        print(f"{name}: {r['samples_per_s']:.1f} samples/s, {r['tokens_per_s']:.0f} tokens/s, "
              f"MFU {r['mfu']:.1%}, step {r['step_s']:.2f}s, peak {r['peak_gib']:.1f} GiB "
              f"(swap {trainer.swap}, checkpointing {trainer.checkpointing}, graphs {trainer.micro.graphs is not None}, "
              f"bf16 copies {trainer.micro.lowp is not None and ('fused' if trainer.micro.lowp.fused else 'unfused')}, "
              f"graphs captured while timing {r['graphs_captured_timed']})", flush=True)
        trainer = None  # its memory freed before the next variant
        set_inductor(restore_inductor)
        write_results(args, peak, device, results)  # after every variant: a cut-off call keeps the others
    write_results(args, peak, device, results)
    curves = [r for r in results if "losses" in r and len(r["losses"]) >= 10]
    for r in curves[1:]:
        a, b = curves[0]["losses"], r["losses"]
        n = min(len(a), len(b))
        rel = max(abs(x - y) / abs(x) for x, y in zip(a[:n], b[:n]))
        print(f"loss curve {r['name']} vs {curves[0]['name']} over {n} steps: max relative difference {rel:.2e}")
    print("\n| variant | samples/s | tokens/s | MFU | step s | peak GiB | real/computed tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if r.get("error"):
            print(f"| {r['name']} | failed: {r['error'][:60]} | | | | | |")
        elif "stopped_at" in r:
            print(f"| {r['name']} | stopped after step {r['stopped_at']} (state saved) | | | | | |")
        else:
            print(f"| {r['name']} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['mfu']:.1%} | "
                  f"{r['step_s']:.2f} | {r['peak_gib']:.1f} | {r['real_token_share']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
