"""The largest micro-batch that fits this machine: for `--batch-size auto` and train-local's summary.

On a GPU it is measured: for each candidate (the divisors of the effective batch, largest
first) one real forward and backward of the longest training texts, as the run will train
(precision, R-Drop, activation checkpointing, swap manager), with the memory the run adds
later held in reserve (the AdamW moments made at the first step, the EMA, the bf16 weight
copies). A candidate fits when nothing runs out of memory and the peak stays within 90% of
the GPU, leaving room for fragmentation. This is how PyTorch Lightning's batch-size finder and Accelerate's
`find_executable_batch_size` work too: try, catch the out-of-memory error, go smaller.

On the CPU no out-of-memory error can be caught (the kernel kills the process), so the
choice is estimated: the largest candidate whose `memory.estimate` fits in 80% of the memory
this process may still use.
"""
from __future__ import annotations

import copy
import gc
import logging
from typing import Any

import psutil
import torch

from redheart.config import Config
from redheart.data.features import FeatureSource
from redheart.model.modules import count_parameters, preset_parameter_counts
from redheart.train import memory
from redheart.train.batching import accumulation
from redheart.train.step import forward_loss

log = logging.getLogger("redheart")

GIB = 2**30


def candidates(effective: int) -> list[int]:
    """Micro-batch sizes that split the effective batch evenly, largest first."""
    return [m for m in range(effective, 0, -1) if effective % m == 0]


def with_micro_batch(cfg: Config, micro_batch: int) -> Config:
    """`cfg` training with `micro_batch`, the accumulation recomputed (effective batch kept)."""
    eff = cfg.effective_batch
    cfg.train.micro_batch, cfg.train.grad_accum = micro_batch, accumulation(eff, micro_batch)
    return cfg


def largest_micro_batch(cfg: Config, source: FeatureSource, device: torch.device,
                        faults: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"micro_batch", "how" (measured | estimated), "tried": [...], "capacity_gib"}.

    `faults["oom_above_micro_batch"] = N` (tests) makes every candidate above N run out of
    memory as a GPU with less memory would, and so lets the measured path run on the CPU.
    """
    faults = faults or {}
    if device.type == "cuda" or "oom_above_micro_batch" in faults:
        return _measure(cfg, source, device, faults)
    return _estimate(cfg)


def _estimate(cfg: Config) -> dict[str, Any]:
    params = preset_parameter_counts(cfg)["total"]
    room = (psutil.virtual_memory().available + psutil.Process().memory_info().rss) / GIB
    tried = []
    for m in candidates(cfg.effective_batch):
        need = memory.estimate(with_micro_batch(copy.deepcopy(cfg), m), params)["total_gib"]
        tried.append({"micro_batch": m, "estimate_gib": round(need, 3), "fits": need <= 0.8 * room})
        if tried[-1]["fits"]:
            return {"micro_batch": m, "how": "estimated", "tried": tried, "capacity_gib": room}
    return {"micro_batch": 1, "how": "estimated", "tried": tried, "capacity_gib": room}


def _measure(cfg: Config, source: FeatureSource, device: torch.device, faults: dict[str, Any]) -> dict[str, Any]:
    from redheart.model.network import RedHeartNet, Stack
    from redheart.train.plan import amp_dtype, memory_cap_gib, plan_memory, use_bf16_weights

    cuda = device.type == "cuda"
    cap = memory_cap_gib(device)
    torch.manual_seed(cfg.train.seed)
    with device:
        model = RedHeartNet(cfg.model).train()
    params = count_parameters(model)["total"]
    profile = memory.data_profile(source.data.lengths.tolist(), source.data.head_counts(),
                                  source.flat.numel() * source.flat.element_size() if source.cached else 0)
    swap, checkpointing, _ = plan_memory(cfg, device, params, profile=profile)
    for m in model.modules():
        if isinstance(m, Stack):
            m.checkpointing = checkpointing
    dtype = amp_dtype(cfg, device)
    # what the run adds on the GPU after this search: the AdamW moments (at the first step) and
    # the EMA, unless the swap manager keeps them in CPU memory, and the bf16 weight copies
    keep_on_gpu = not swap and cfg.tech.ema_decay > 0 and cfg.tech.ema_device == "same"
    reserve = (0 if swap else 8 * params) + (4 * params if keep_on_gpu else 0)
    lengths = source.data.lengths
    longest = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    tried: list[dict[str, Any]] = []
    chosen = None
    for m in candidates(cfg.effective_batch):
        idx = [longest[i % len(longest)] for i in range(m)]  # the longest texts, repeated if too few
        copies = 2 * params if use_bf16_weights(with_micro_batch(copy.deepcopy(cfg), m), device, dtype, swap) else 0
        entry: dict[str, Any] = {"micro_batch": m}
        try:
            if m > faults.get("oom_above_micro_batch", float("inf")):
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected by a test above micro-batch "
                                             f"{faults['oom_above_micro_batch']})")
            peak = _one_pass(model, source, idx, cfg, dtype, reserve + copies)
            if peak is not None:
                entry["peak_gib"] = round(peak, 3)
            entry["fits"] = cap is None or peak is None or peak <= 0.9 * cap
        except torch.OutOfMemoryError:  # the failed pass's tensors went with its frame
            entry["fits"] = False
            entry["out_of_memory"] = True
        finally:
            model.zero_grad(set_to_none=True)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
        tried.append(entry)
        if entry["fits"]:
            note = f"fits (peak {entry['peak_gib']:.1f} GiB)" if "peak_gib" in entry else "fits"
        else:
            note = "does not fit (out of memory)" if entry.get("out_of_memory") else \
                f"does not fit (peak {entry['peak_gib']:.1f} of {cap:.1f} GiB)"
        log.info("micro-batch %d: %s", m, note)
        if entry["fits"]:
            chosen = m
            break
    del model
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"micro_batch": chosen or 1, "how": "measured", "tried": tried, "capacity_gib": cap}


def _one_pass(model: torch.nn.Module, source: FeatureSource, idx: list[int], cfg: Config,
              dtype: torch.dtype | None, reserve: int) -> float | None:
    """One forward and backward of the samples `idx` with `reserve` bytes held aside; the peak
    GPU memory in GiB (None on the CPU). Its tensors live in this frame only, so an
    out-of-memory error frees them as it leaves."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    ballast = torch.empty(reserve, dtype=torch.uint8, device=device)  # noqa: F841 (held, not read)
    states, batch = source(idx)
    keep = batch.keep.to(device)
    tgt = {k: v.to(device) for k, v in batch.targets.items()}
    lens = [int(source.data.lengths[i]) for i in idx]
    loss, _ = forward_loss(model, states, keep, min(lens) != max(lens), tgt, source.data.head_counts(idx),
                           cfg.tech, cfg.train.head_weights, dtype)
    loss.backward()
    if not cuda:
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / GIB


def preset_needs(capacity_gib: float | None, on_gpu: bool) -> list[dict[str, Any]]:
    """The estimated training memory of every preset at its own micro-batch, against this machine."""
    from redheart.config import PRESETS, preset

    rows = []
    for name in PRESETS:
        cfg = preset(name)
        est = memory.estimate(cfg, preset_parameter_counts(cfg)["total"])
        fits = capacity_gib is None or est["total_gib"] <= 0.9 * capacity_gib
        verdict = "fits" if fits else ("the swap manager" if on_gpu else "does not fit")
        rows.append({"preset": name, "micro_batch": cfg.train.micro_batch, "need_gib": round(est["total_gib"], 2),
                     "verdict": verdict})
    return rows


def memory_summary(probe: dict[str, Any], samples: list[dict[str, float]], cfg: Config,
                   device: torch.device) -> tuple[str, dict[str, Any]]:
    """train-local's closing summary: what this run used, the largest micro-batch that fits and
    every preset's estimated need on this machine (text for the log, and a record)."""
    on_gpu = device.type == "cuda"
    capacity = probe["capacity_gib"]
    used = max((s.get("peak_gib", s["rss_gib"]) for s in samples), default=0.0)
    what = "peak GPU memory allocated" if on_gpu else "peak process memory (RSS)"
    where = (f"{torch.cuda.get_device_name(device)}, {capacity:.1f} GiB" if on_gpu
             else f"CPU, {capacity:.1f} GiB of memory this process may use")
    m = probe["micro_batch"]
    how = ("measured: a forward and backward of the longest training texts, optimizer state held in reserve"
           if probe["how"] == "measured" else "estimated from the memory model")
    needs = preset_needs(capacity, on_gpu)
    lines = [f"memory on this machine ({where}):",
             f"  this run: {what} {used:.2f} GiB at micro-batch {cfg.train.micro_batch}",
             f"  largest micro-batch that fits ({cfg.preset}, effective batch {cfg.effective_batch}): {m} "
             f"x accumulation {cfg.effective_batch // m} ({how}); use --batch-size {m} or --batch-size auto",
             "  estimated need of each preset at its own micro-batch:"]
    lines += [f"    {r['preset']:<8} micro-batch {r['micro_batch']:<3} {r['need_gib']:>7.2f} GiB  {r['verdict']}"
              for r in needs]
    record = {"device": where, "used_gib": used, "largest_micro_batch": m, "how": probe["how"],
              "tried": probe["tried"], "presets": needs}
    return "\n".join(lines), record
