"""How a run trains on this machine, settled once before its first step: the device, the
precision and every `auto` switch (swap manager, activation checkpointing, CUDA graphs,
packing, varlen attention, bf16 weight copies, the compile wrapper, background saves), in one
`RunPlan` that the log shows and the run keeps beside its logs (`RunPaths.plan_file`).

Each switch is decided by a small rule of its own (`use_*`), from the config and the device;
`settle_plan` applies them in the order they depend on each other.
"""
from __future__ import annotations

import gc
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from redheart.ckpt import io as ckio
from redheart.ckpt.state import RunPaths
from redheart.config import Config, ConfigError
from redheart.data.dataset import TaskData
from redheart.data.features import FeatureSource
from redheart.dist import World, shard_model
from redheart.model import varlen
from redheart.model.network import Block, Stack
from redheart.train import memory
from redheart.train.step import forward_loss, plan_packing, towers_run

log = logging.getLogger("redheart")


@dataclass
class RunPlan:
    """What `settle_plan` decided. An out-of-memory error may later turn the swap manager on
    (and activation checkpointing with it): the run's `oom_events` record that."""

    device: str  # "cpu", "cuda:0", ...
    precision: str  # "bf16" (autocast) or "fp32"
    parallel: str  # "single" (one process), "ddp" or "fsdp"
    processes: int
    swap: bool  # the Dynamic Swap Manager: AdamW's state and update in CPU memory
    swap_why: str  # what decided it ("" when off)
    activation_checkpointing: bool
    ema_device: str | None  # where the EMA weights live; None: no EMA
    bf16_weights: bool  # bf16 weight copies cast once per optimizer step (model/lowp.py)
    cuda_graphs: bool
    packing: bool  # the texts of a micro-batch share rows in the token-wise layers
    varlen_attention: bool  # packed rows attend within each text's segment (FlashAttention)
    compile: bool  # each Transformer layer compiled (torch.compile)
    cpp_wrapper: bool  # compiled layers launch their kernels from C++
    overlap_grad_reduce: bool  # several processes: each bucket's all-reduce starts in the backward
    async_save: bool  # epoch-end resume states written from a thread
    deferred_checks: bool = False  # the finite check left on the device (`Update.defers_checks`)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None: full fp32)."""
        return torch.bfloat16 if self.precision == "bf16" else None

    @property
    def fsdp(self) -> bool:
        return self.parallel == "fsdp"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        on = [k for k, v in self.to_dict().items() if v is True]
        return (f"{self.device}, {self.precision}, {self.parallel} x{self.processes}; on: {', '.join(on) or 'nothing'}"
                + (f"; swap manager: {self.swap_why}" if self.swap_why else ""))


def settle_plan(cfg: Config, device: torch.device, world: World, params: int, profile: dict[str, Any],
                measure: Callable[[], float | None] | None = None) -> RunPlan:
    """The run's plan for a model of `params` parameters trained on data of `profile`
    (`memory.data_profile`); `measure`: see `plan_memory`."""
    dtype = amp_dtype(cfg, device)
    fsdp = world.active and cfg.train.parallel == "fsdp"
    swap, checkpointing, why = plan_memory(cfg, device, params, fsdp, profile, measure)
    packing = use_packing(cfg)
    graphs = use_cuda_graphs(cfg, device) and not checkpointing and not fsdp
    ema_device = None
    if cfg.tech.ema_decay > 0:
        ema_device = "cpu" if cfg.tech.ema_device == "cpu" or swap else str(device)
    return RunPlan(
        device=str(device), precision="fp32" if dtype is None else "bf16",
        parallel="fsdp" if fsdp else "ddp" if world.active else "single", processes=world.size,
        swap=swap, swap_why=why, activation_checkpointing=checkpointing, ema_device=ema_device,
        # FSDP gathers the weights for every forward: no copies to keep
        bf16_weights=use_bf16_weights(cfg, device, dtype, swap) and not fsdp,
        cuda_graphs=graphs, packing=packing,
        varlen_attention=packing and use_varlen_attention(cfg, device, dtype, graphs),
        compile=cfg.train.compile, cpp_wrapper=cfg.train.compile and use_cpp_wrapper(cfg, device),
        overlap_grad_reduce=(world.active and not fsdp and device.type == "cuda" and cfg.train.overlap_grad_reduce),
        async_save=cfg.train.async_save == "on" or (cfg.train.async_save == "auto" and device.type == "cuda"))


def write_plan(plan: RunPlan, paths: RunPaths) -> None:
    """The plan beside the run's logs (`RunPaths.plan_file`), this launch's: a resume on another
    machine may settle another. A failed write is logged (and stops the run, as every one does)."""
    doc = {"run_id": paths.run_id, "plan": plan.to_dict()}
    try:
        ckio.atomic_write_text(json.dumps(doc, indent=1) + "\n", paths.plan_file)
    except ckio.CheckpointError as exc:
        log.error("run plan not written: %s", exc)


def prepare_model(model: torch.nn.Module, plan: RunPlan, cfg: Config, world: World) -> None:
    """Set `model` up as `plan` says: activation checkpointing, FSDP sharding (before the
    optimizer, which must hold the sharded parameters), compiled layers."""
    if plan.activation_checkpointing and not cfg.model.activation_checkpointing:
        set_checkpointing(model, True)
    if plan.swap:
        log.info("Dynamic Swap Manager on: optimizer state and update in pinned CPU memory (%s)", plan.swap_why)
    if plan.fsdp:
        shard_model(model, Block)
        log.info("FSDP: weights, gradients and optimizer state sharded across %d processes", world.size)
    if plan.compile:
        compile_blocks(model, cpp_wrapper=plan.cpp_wrapper)
        log.info("layers compiled (torch.compile, %s wrapper)", "C++" if plan.cpp_wrapper else "Python")


def checkpointing_on(model: torch.nn.Module) -> bool:
    return any(getattr(m, "checkpointing", False) for m in model.modules())


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, Stack):
            m.checkpointing = on


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={name}: no CUDA GPU is visible to PyTorch")
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    return dev


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs that support it (or when asked); None = full fp32."""
    p = cfg.train.precision
    if p == "fp32":
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if p == "bf16":
        return torch.bfloat16
    return None


def use_cuda_graphs(cfg: Config, device: torch.device) -> bool:
    """CUDA graphs pay where launches dominate: small micro-batches on a GPU, eager layers."""
    mode = cfg.train.cuda_graphs
    if device.type != "cuda" or mode == "off":
        return False
    return mode == "on" or (cfg.train.micro_batch <= 8 and not cfg.train.compile
                            and not cfg.model.activation_checkpointing and cfg.train.micro_batch_tokens == 0
                            and not (cfg.train.packed_attention == "varlen" and use_packing(cfg)))


# CUDA graphs replay fixed shapes: packed rows are made up to a multiple of this, so that a few
# graphs cover every micro-batch (each graph's made-up rows are computed for nothing)
PACKED_ROWS_MULTIPLE = 2


def use_packing(cfg: Config) -> bool:
    """Packing pays where a micro-batch holds many texts of different lengths. The small
    micro-batches that get CUDA graphs by default keep the padded layout; graphs asked for at a
    large micro-batch replay packed rows (slower than compiled layers without graphs on an H200:
    345.2 against 485.1 samples/s, bench/RESULTS.md)."""
    mode = cfg.train.packing
    return mode == "on" or (mode == "auto" and cfg.train.micro_batch > 8)


def use_varlen_attention(cfg: Config, device: torch.device, dtype: torch.dtype | None, graphs: bool) -> bool:
    """Packed rows attend within each text's segment where FlashAttention runs: micro-batch 64,
    compiled, on an H200: see `train.packed_attention`. CUDA graphs keep the padded attention
    (a graph replays a fixed number of segments; asked for both, config validation refuses)."""
    mode = cfg.train.packed_attention
    if mode == "padded" or graphs:
        return False
    if varlen.available(device, dtype):
        return True
    if mode == "varlen":
        raise ConfigError(f"train.packed_attention=varlen: FlashAttention's variable-length kernels need a GPU of "
                          f"compute capability 8.0 or newer and bf16/fp16 autocast; here {device}, "
                          f"{str(dtype).replace('torch.', '') if dtype else 'no autocast'}")
    return False


def preflight(cfg: Config) -> None:
    """Settings this machine cannot run, refused before a run's folder is made."""
    device = pick_device(cfg.train.device)
    if use_packing(cfg) and cfg.train.packed_attention == "varlen":
        use_varlen_attention(cfg, device, amp_dtype(cfg, device), graphs=False)


def use_bf16_weights(cfg: Config, device: torch.device, dtype: torch.dtype | None, swap: bool) -> bool:
    """Low-precision weight copies pay where autocast would cast every weight once per
    micro-batch: bf16 autocast on a GPU with gradient accumulation (micro-batch 2 x 32: 118.8 ->
    155.7 samples/s on an H200). Not with one micro-batch per step (nothing to save), not with
    compiled layers (the copies' graph breaks cost more than they save: 389.6 -> 265.9 samples/s
    at micro-batch 64), not with the swap manager, whose point is memory (2 bytes a weight)."""
    mode = cfg.train.bf16_weights
    if mode == "off" or dtype != torch.bfloat16 or swap:
        return False
    return mode == "on" or (device.type == "cuda" and cfg.train.grad_accum > 1 and not cfg.train.compile)


def use_cpp_wrapper(cfg: Config, device: torch.device) -> bool:
    """Compiled layers launch their kernels from C++ where the host bounds the step: on a GPU
    (`train.compile_wrapper`)."""
    mode = cfg.train.compile_wrapper
    return mode == "cpp" or (mode == "auto" and device.type == "cuda")


def compile_blocks(model: torch.nn.Module, cpp_wrapper: bool = False) -> None:
    """Regional compilation: each Transformer layer is compiled (they share one compiled code,
    so compiling costs about one layer's time, not the whole network's). With `cpp_wrapper`
    Inductor launches the layer's kernels from generated C++ instead of Python
    (`train.compile_wrapper`)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # Dropout from ATen's generator, as in eager mode, instead of Inductor's in-kernel random
    # numbers: the compiled GPU step took 97 instead of 100 ms (profile, micro-batch 64; R-Drop on
    # 318.0 against 310.0-312.4 samples/s, bench/RESULTS.md), and compiled layers draw the same
    # masks as eager ones
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    torch._inductor.config.cpp_wrapper = cpp_wrapper
    for m in model.modules():
        if isinstance(m, Block):
            m.compile(dynamic=True)


def memory_cap_gib(device: torch.device) -> float | None:
    """The GPU memory this process may use (the card's, times any per-process fraction)."""
    if device.type != "cuda":
        return None
    total = memory.device_memory_gib(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return total * torch.cuda.get_per_process_memory_fraction(index)


# Within this share of the 90% line the estimate cannot decide alone: a forward and backward of
# the heaviest micro-batch is measured instead (the estimate is within ~15% of measured peaks)
UNCERTAIN = 0.15


def plan_memory(cfg: Config, device: torch.device, params: int, fsdp: bool = False,
                profile: dict[str, Any] | None = None,
                measure: Callable[[], float | None] | None = None) -> tuple[bool, bool, str]:
    """(swap manager on, activation checkpointing on, why) from the estimate (of this data:
    `memory.data_profile`) and the GPU; where the estimate is within `UNCERTAIN` of the line,
    from `measure()`: the peak GiB of a forward and backward of the heaviest micro-batch with
    the optimizer state held in reserve (None: it ran out of memory). Never the swap manager
    under FSDP, which shards the optimizer state instead."""
    cap = memory_cap_gib(device)
    mode = "off" if fsdp else cfg.memory.swap
    if mode == "on" and cap is None:  # no GPU: the CPU path of the swap manager (used by tests)
        return True, cfg.model.activation_checkpointing, "memory.swap=on"
    if cap is None or mode == "off":
        return False, cfg.model.activation_checkpointing, ""
    need = memory.estimate(cfg, params, **(profile or {}))
    line = 0.9 * cap
    if mode == "on":
        swap, why = True, "memory.swap=on"
    elif measure is not None and abs(need["total_gib"] - line) <= UNCERTAIN * line:
        peak = measure()
        swap = peak is None or peak > line
        measured = "ran out of memory" if peak is None else f"peaked at {peak:.1f} GiB"
        why = (f"estimated need {need['total_gib']:.1f} GiB, near 90% of {cap:.1f} GiB: a forward and backward of "
               f"the heaviest micro-batch {measured}")
        log.info("memory: %s: the Dynamic Swap Manager %s", why, "on" if swap else "stays off")
    else:
        swap = need["total_gib"] > line
        why = f"estimated need {need['total_gib']:.1f} GiB > 90% of {cap:.1f} GiB" if swap else ""
    ckpt = cfg.model.activation_checkpointing
    if swap and not ckpt:
        on_gpu = need["weights_gib"] + need["gradients_gib"] + need["activations_gib"] + need["encoder_gib"]
        if on_gpu > 0.8 * cap:
            ckpt = True
            why += f"; activation checkpointing on (weights + gradients + activations {on_gpu:.1f} GiB)"
    return swap, ckpt, why


def heaviest_texts(lengths: list[int], micro_batch: int, tokens: int) -> list[int]:
    """Indices of `micro_batch` texts whose lengths sum to at least `tokens` (where they can):
    the k longest and the shortest for the rest, with k as small as reaches it."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    order = [order[i % len(order)] for i in range(max(micro_batch, len(order)))]
    longest, shortest = order[:micro_batch], order[::-1][:micro_batch]
    for k in range(micro_batch + 1):
        pick = longest[:k] + shortest[:micro_batch - k]
        if sum(int(lengths[i]) for i in pick) >= tokens:
            return pick
    return longest


def measure_heaviest(model: torch.nn.Module, cfg: Config, source: FeatureSource, data: TaskData,
                     device: torch.device, params: int) -> float | None:
    """Peak GPU memory (GiB) of one forward and backward of the heaviest micro-batch the
    estimate expects (`memory.heaviest_micro_batch`), as this run computes it (precision,
    R-Drop, packing, the towers with targets; eager layers, which keep a little more than
    compiled ones), with the AdamW moments and the EMA the run adds later held in reserve;
    None if it runs out of memory. `plan_memory`'s `measure`, before the optimizer exists."""
    dtype = amp_dtype(cfg, device)
    lengths = data.lengths.tolist()
    packed = use_packing(cfg)
    tokens = memory.heaviest_micro_batch(lengths, cfg.train.micro_batch, cfg.model.max_tokens, packed)
    idx = heaviest_texts(lengths, cfg.train.micro_batch, tokens)
    reserve = 8 * params + (4 * params if cfg.tech.ema_decay > 0 and cfg.tech.ema_device == "same" else 0)
    varlen_ok = packed and cfg.train.packed_attention != "padded" and varlen.available(device, dtype)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        ballast = torch.empty(reserve, dtype=torch.uint8, device=device)  # noqa: F841 (held, not read)
        states, batch = source(idx)
        keep = batch.keep.to(device)
        tgt = {k: v.to(device) for k, v in batch.targets.items()}
        lens = [int(lengths[i]) for i in idx]
        counts = data.head_counts(idx)
        packing = plan_packing(lens, cfg.tech, device, segments=varlen_ok) if packed else None
        model.train()
        loss, _ = forward_loss(model, states, keep, min(lens) != max(lens), tgt, counts, cfg.tech,
                               cfg.train.head_weights, dtype, packing=packing, heads=towers_run(counts))
        loss.backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**30
    except torch.OutOfMemoryError:
        return None
    finally:
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
