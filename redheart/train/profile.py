"""One optimizer step under torch.profiler, summarised: where the GPU's time goes (matrix
products, attention, communication, ...), how busy the GPU was, and what the host spent its
time on. Used by the trainer (`--set train.profile_step=K`: every rank profiles its global step
K and writes the summary and a Chrome trace beside the logs) and by bench/bench_train.py.
"""
from __future__ import annotations

import bisect
import json
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch

log = logging.getLogger("redheart")
T = TypeVar("T")

KINDS = (  # first match wins; names of cuBLAS/cuDNN/Triton/ATen/NCCL kernels, lower case
    ("communication", ("nccl", "allreduce", "reduce_scatter", "allgather")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "clip")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "sm90_", "sm100_", "matmul", "cublas")),
    ("norm/reduce", ("layer_norm", "layernorm", "reduce", "softmax", "norm", "sum")),
    ("cast/copy", ("copy", "cast", "convert", "to_copy", "fill", "memset", "memcpy", "cat")),
    ("element-wise", ("elementwise", "vectorized", "unrolled", "triton", "dropout", "gelu", "mul", "add")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    return sum(b - a for a, b in merged(intervals))


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of [start, end) intervals as sorted, disjoint intervals."""
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def overlap_time(x: list[tuple[float, float]], y: list[tuple[float, float]]) -> float:
    """How long some interval of `x` and some interval of `y` run at the same time."""
    x, y, i, j, total = merged(x), merged(y), 0, 0, 0.0
    while i < len(x) and j < len(y):
        total += max(0.0, min(x[i][1], y[j][1]) - max(x[i][0], y[j][0]))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


MICRO_BATCH = "redheart: micro-batch of "  # the trainer's annotation of each micro-batch in a profiled step


def micro_batch_times(events: list[dict]) -> list[dict]:
    """Each micro-batch the trainer annotated (`MICRO_BATCH`, its texts and tokens in the name),
    grouped by name: how many, the host's time inside them, and the GPU's: from the first to the
    last kernel launched inside one, gaps included, and the kernels' own time; means per
    micro-batch, in ms (GPU None without kernels). A kernel is found by the correlation id of
    its launch call (runtime, or driver for Triton's), which every kernel of a replayed CUDA
    graph shares with its cudaGraphLaunch; a launch belongs to the range whose time holds it
    (the backward's, from autograd's own thread, too). What a micro-batch of a given size costs,
    to weigh the shares of several GPUs by."""
    ranges = sorted((e for e in events if e.get("cat") == "user_annotation" and "dur" in e
                     and e.get("name", "").startswith(MICRO_BATCH)), key=lambda e: e["ts"])
    starts = [e["ts"] for e in ranges]
    owner: dict[int, int] = {}  # launch call's correlation id -> range
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {}):  # driver: Triton's
            k = bisect.bisect_right(starts, e["ts"]) - 1
            if k >= 0 and e["ts"] <= ranges[k]["ts"] + ranges[k]["dur"]:
                owner[e["args"]["correlation"]] = k
    gpu: dict[int, list[tuple[float, float]]] = {}
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e:
            k = owner.get(e.get("args", {}).get("correlation"))
            if k is not None:
                gpu.setdefault(k, []).append((e["ts"], e["ts"] + e["dur"]))
    groups: dict[str, dict] = {}
    for k, r in enumerate(ranges):
        g = groups.setdefault(r["name"][len(MICRO_BATCH):], {"count": 0, "host_ms": 0.0, "gpu_ms": 0.0,
                                                             "kernel_ms": 0.0, "kernels": 0})
        spans = gpu.get(k, [])
        g["count"] += 1
        g["host_ms"] += r["dur"] / 1e3
        g["kernels"] += len(spans)
        if spans:
            g["gpu_ms"] += (max(b for _, b in spans) - min(a for a, _ in spans)) / 1e3
            g["kernel_ms"] += sum(b - a for a, b in spans) / 1e3
    return [{"micro_batch": name, "count": g["count"], "host_ms": g["host_ms"] / g["count"],
             "gpu_ms": g["gpu_ms"] / g["count"] if g["kernels"] else None,
             "kernel_ms": g["kernel_ms"] / g["count"] if g["kernels"] else None,
             "kernels": g["kernels"] // g["count"]} for name, g in groups.items()]


def micro_batch_lines(summary: dict) -> list[str]:
    """`micro_batches` of a summary as lines of text, smallest first."""
    out = []
    for m in sorted(summary.get("micro_batches", []), key=lambda m: [int(x) for x in m["micro_batch"].split()[::2]]):
        gpu = f"{m['gpu_ms']:.2f} ms on the GPU ({m['kernel_ms']:.2f} in kernels)" if m["gpu_ms"] else "no GPU"
        out.append(f"micro-batch of {m['micro_batch']}: x{m['count']}, {gpu}, host {m['host_ms']:.2f} ms")
    return out


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
CLOSING = "redheart: profiler's closing sync"  # `profiled`'s own wait at the end: not the step's


def host_waits(events: list[dict], min_ms: float = 0.5) -> list[dict]:
    """Where the host waited for the GPU inside a profile: each CUDA synchronize call of at least
    `min_ms`, when (ms from the first event), how long, and the innermost operation around it
    (`aten::copy_` for a `.item()` or for a host value written into a device tensor). A step
    whose host should run ahead of the GPU and does not shows its culprit here."""
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    if not spans:
        return []
    t0 = min(e["ts"] for e in spans)
    ops = [e for e in spans if e.get("cat") in ("cpu_op", "user_annotation")]
    out = []
    for w in spans:
        if w.get("cat") != "cuda_runtime" or w["name"] not in SYNC_CALLS or w["dur"] < min_ms * 1e3:
            continue
        around = [o for o in ops if o["ts"] <= w["ts"] and w["ts"] + w["dur"] <= o["ts"] + o["dur"]]
        op = min(around, key=lambda o: o["dur"])["name"] if around else None
        if op != CLOSING:
            out.append({"at_ms": (w["ts"] - t0) / 1e3, "ms": w["dur"] / 1e3, "call": w["name"], "op": op})
    return out


def summarize(prof, trace: Path, wall_s: float) -> dict:
    """The kernels of a finished profile (read back from its Chrome trace at `trace`)."""
    events = json.loads(trace.read_text()).get("traceEvents", [])
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    by_kind: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for e in gpu:
        ms = e["dur"] / 1e3
        kind = kernel_kind(e["name"]) if e["cat"] == "kernel" else "cast/copy"
        by_kind[kind] = by_kind.get(kind, 0.0) + ms
        by_name.setdefault(e["name"], []).append(ms)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:15]
    busy = busy_time([(e["ts"], e["ts"] + e["dur"]) for e in gpu]) / 1e3
    spans: dict[bool, list[tuple[float, float]]] = {True: [], False: []}  # communication or not
    for e in gpu:
        spans[e["cat"] == "kernel" and kernel_kind(e["name"]) == "communication"].append((e["ts"], e["ts"] + e["dur"]))
    wall_ms = wall_s * 1e3
    return {"wall_ms": wall_ms, "gpu_busy_ms": busy, "busy": busy / wall_ms if gpu else 0.0,
            "kernels": len(gpu), "kernel_ms": sum(by_kind.values()),
            "communication_ms": busy_time(spans[True]) / 1e3,
            # of which beside other kernels (an all-reduce overlapped with the backward)
            "communication_overlapped_ms": overlap_time(spans[True], spans[False]) / 1e3,
            "by_kind_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:160], "calls": len(v), "ms": sum(v), "kind": kernel_kind(n)} for n, v in top],
            "host_top": [{"name": a.key, "calls": a.count, "self_cpu_ms": a.self_cpu_time_total / 1e3}
                         for a in sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:12]
                         if a.key != CLOSING],
            "host_waits": host_waits(events),
            "micro_batches": micro_batch_times(events),
            "trace": str(trace)}


@contextmanager
def profiled(device: torch.device, trace: Path):
    """Profile the block (the device synchronised on both sides) and put its summary into the
    dict this yields once the block is done; the Chrome trace goes to `trace`."""
    from torch.profiler import ProfilerActivity, profile

    trace.parent.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    summary: dict = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        yield summary
        if device.type == "cuda":
            with torch.profiler.record_function(CLOSING):
                torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    prof.export_chrome_trace(str(trace))
    summary.update(summarize(prof, trace, wall))


def profile_step(run: Callable[[], T], device: torch.device, logs: Path, step: int, rank: int) -> T:
    """`train.profile_step`: `run()` (global step `step`) under torch.profiler, its summary and
    trace written into `logs` by every rank (each its own files), what it shows in one log line."""
    from redheart.ckpt import io as ckio

    name = f"profile_step{step}_rank{rank}"
    with profiled(device, logs / f"{name}.trace.json") as summary:
        out = run()
    ckio.atomic_write_text(json.dumps(summary, indent=1), logs / f"{name}.json")
    if summary["kernels"]:
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in summary["by_kind_ms"].items())
        what = (f"GPU busy {100 * summary['busy']:.0f}% ({summary['kernels']} kernels, "
                f"{summary['kernel_ms']:.1f} ms: {kinds})")
    else:
        top = summary["host_top"][0] if summary["host_top"] else {"name": "-", "self_cpu_ms": 0.0}
        what = f"no GPU kernels; the busiest host operation {top['name']} {top['self_cpu_ms']:.1f} ms"
    if summary["host_waits"]:  # a host that should run ahead of the GPU waited: where
        longest = max(summary["host_waits"], key=lambda w: w["ms"])
        what += (f"; the host waited for the GPU {sum(w['ms'] for w in summary['host_waits']):.1f} ms "
                 f"(longest {longest['ms']:.1f} ms in {longest['op']})")
    log.info("step %d profiled: %.1f ms, %s; %s", step, summary["wall_ms"], what, logs / f"{name}.json")
    return out
