"""The training loop. It reads top to bottom:

    for each epoch: for each optimizer step of the epoch's plan:
        forward/backward over the step's micro-batches -> clip -> AdamW -> schedule -> EMA
    then: validate (raw and EMA) -> metrics record -> snapshot -> resume state -> prune

Everything the loop needs to continue exactly is in `resume_state()`; `restore()` puts it back.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import record_function
from torch.utils._pytree import tree_map_only

from redheart.ckpt import io as ckio
from redheart.ckpt.rebuild import rebuild_initial_weights, weights_fingerprint
from redheart.ckpt.retention import select_deletions
from redheart.ckpt.sweetspot import pinned_epochs
from redheart.ckpt.state import (RunPaths, capture_rng, iso_now, read_registry, restore_rng, sidecar_path,
                                 write_registry)
from redheart.config import Config, ConfigError
from redheart.data.dataset import epoch_plan, micro_batches, shares
from redheart.data.features import FeatureSource, to_device
from redheart.data.pipeline import DataBundle
from redheart.dist import (LOSS_KEYS, FlatGrads, GradReadiness, World, all_objects, any_rank, broadcast, gather_rows,
                           gathered, is_dtensor, is_fsdp, shard_like, shard_model, shard_optimizer_state,
                           sum_scalars, unpack_scalars)
from redheart.model import varlen
from redheart.model.lowp import LowPrecisionCopies
from redheart.model.modules import count_parameters
from redheart.model.network import ENCODER_TOP, Block, RedHeartNet, head_values
from redheart.train import memory
from redheart.train.ema import EMA
from redheart.train.flops import measure_peak_tflops, train_flops
from redheart.train.step import GraphedMicroSteps, forward_loss, inverse_counts, micro_batch_tokens, plan_packing
from redheart.train.swap import SwapAdamW
from redheart.train.metrics import collapsed_heads, head_metrics
from redheart.train.profile import MICRO_BATCH
from redheart.train.schedule import warmup_cosine

log = logging.getLogger("redheart")


class TrainingStopped(Exception):
    """Training stopped before the end with a resumable state saved (signal, OOM, bad steps)."""

    def __init__(self, reason: str, resume_path: str | None, code: int):
        super().__init__(reason)
        self.reason, self.resume_path, self.code = reason, resume_path, code


@dataclass
class StopFlag:
    requested: bool = False
    signal_name: str = ""
    write_failure: Exception | None = None  # the first failed write (`ckio.report_write_failure`), if one stopped it


class StepAbandoned(Exception):
    """A stop request met between the micro-batches of an optimizer step: the step's partial
    gradients are dropped and the RNG streams put back as they were before it (`accumulate`),
    so the state saved is that of the last completed step and a resume redoes this one exactly."""


@dataclass
class StepStats:
    """Loss components summed on the device over steps; read once per logging interval."""
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    samples: int = 0
    tokens: int = 0
    lrs: list[float] = field(default_factory=list)  # the LR of each optimizer step of the epoch
    flops: float = 0.0  # model FLOPs of the steps (all ranks' work), for TFLOP/s and MFU

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()

    def means(self) -> dict[str, float]:
        return {k: float(v) / max(self.steps, 1) for k, v in self.sums.items()}

    def state(self) -> dict[str, Any]:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "steps": self.steps,
                "samples": self.samples, "tokens": self.tokens, "lrs": self.lrs, "flops": self.flops}

    @classmethod
    def from_state(cls, s: dict[str, Any], device: torch.device) -> "StepStats":
        return cls({k: torch.tensor(v, device=device) for k, v in s["sums"].items()},
                   s["steps"], s["samples"], s["tokens"], list(s.get("lrs", [])), float(s.get("flops", 0.0)))


@dataclass
class UncheckedStep:
    """An optimizer step whose finite check is still on the device (`train.finite_check`)."""

    step: int  # the global step, as the log counts it
    parts: dict[str, torch.Tensor]
    ok: torch.Tensor  # the check's result: in pinned host memory once `event` has passed
    event: torch.cuda.Event | None
    vector: torch.Tensor | None = None  # several ranks: the check vector on the device (`apply_update`)


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


def detached_copy(tree: Any) -> Any:
    """`tree` (a state: dicts, lists, tensors) with every tensor copied to the CPU and every
    container new, so that nothing training changes afterwards reaches it."""
    return tree_map_only(torch.Tensor, lambda t: t.detach().to("cpu", copy=True), tree)


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

    from redheart.model.network import Block

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


def param_groups(model: torch.nn.Module, cfg: Config, lr: float) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: weight decay except on biases and norms, and the
    encoder's trainable top layers (`model.encoder_trainable`) at `train.encoder_lr_ratio` of
    the peak LR. Each group's `lr_ratio` is its share of the peak LR (`set_peak_lr`)."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim >= 2, name.startswith(ENCODER_TOP)), []).append(p)
    out = []
    for (decay, encoder), params in groups.items():
        ratio = cfg.train.encoder_lr_ratio if encoder else 1.0
        out.append({"params": params, "weight_decay": cfg.train.weight_decay if decay else 0.0,
                    "lr": lr * ratio, "lr_ratio": ratio})
    return out


def set_peak_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's LR from a new peak LR, each at its `lr_ratio` (the LR sweep and its choice)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_ratio", 1.0)


def build_optimizer(model: torch.nn.Module, cfg: Config, lr: float, device: torch.device,
                    swap: bool = False) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases and norms. Fused kernels (one pass over the weights and
    moments: on a CPU 7.7x faster than the foreach path for 98M parameters); with `swap`, the
    Dynamic Swap Manager's AdamW whose state and update live in CPU memory."""
    groups = param_groups(model, cfg, lr)
    params = [p for g in groups for p in g["params"]]
    if swap:
        return SwapAdamW(model, groups, lr=lr, betas=tuple(cfg.train.betas))
    # fused kernels on the GPU, and on the CPU for plain tensors (FSDP's DTensors: the default)
    fused = device.type == "cuda" or not any(is_dtensor(p) for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.train.betas), fused=fused)


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


@torch.no_grad()
def predict_split(model: torch.nn.Module, source: FeatureSource, batch_size: int,
                  dtype: torch.dtype | None, world: World | None = None) -> dict[str, torch.Tensor]:
    """Predictions for a whole split, in the split's order, on the CPU (model left in eval
    mode): emotion and surd logits, bentham and regret values in [0, 1] (`head_values`).

    Under several processes each rank predicts every world-th text (by length order, so the
    shares cost alike) and the rows are gathered: every rank gets the same full result. Under
    FSDP every forward gathers each layer's weights from all ranks, so every rank runs as many
    batches as rank 0 (which has the most texts); a rank short of texts runs the first text
    again and drops the output.
    """
    world = world or World()
    model.eval()
    n = len(source.data)
    order = sorted(range(n), key=lambda i: (-int(source.data.lengths[i]), i))[world.rank::world.size]
    fsdp = is_fsdp(model)
    outs: dict[str, list[torch.Tensor]] = {}
    for s in range(0, -(-n // world.size) if fsdp else len(order), batch_size):
        idx = order[s:s + batch_size]
        states, batch = source(idx or [0])
        with torch.autocast(states.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = head_values(model(states, batch.keep.to(states.device, non_blocking=True), batch.padded))
        for k, v in out.items():
            if idx:
                outs.setdefault(k, []).append(v.float().cpu())
    if fsdp:  # FSDP keeps the root's gathered weights after a forward (for the backward): free them
        model.reshard()
    if outs:
        local = {k: torch.cat(v) for k, v in outs.items()}
    else:  # more ranks than texts: this rank contributes no rows
        local = {"emotion": torch.zeros(0, 7), "bentham": torch.zeros(0, 10), "regret": torch.zeros(0),
                 "surd": torch.zeros(0, 4)}
    local["index"] = torch.tensor(order, dtype=torch.long)
    rows = gather_rows(local, world)
    inverse = torch.empty(n, dtype=torch.long)
    inverse[rows.pop("index")] = torch.arange(n)
    return {k: v[inverse] for k, v in rows.items()}


def evaluate(model: torch.nn.Module, source: FeatureSource, cfg: Config, dtype: torch.dtype | None,
             world: World | None = None) -> dict[str, float]:
    return validation(model, source, cfg, dtype, world)[0]


def validation(model: torch.nn.Module, source: FeatureSource, cfg: Config, dtype: torch.dtype | None,
               world: World | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """The split's metrics, and the heads whose predictions have collapsed (`collapsed_heads`)."""
    pred = predict_split(model, source, cfg.train.eval_batch, dtype, world)
    tgt = source.data.targets(torch.arange(len(source.data)))
    return head_metrics(pred, tgt, cfg.train.head_weights), collapsed_heads(pred, tgt)


class Trainer:
    def __init__(self, cfg: Config, paths: RunPaths, data: DataBundle, features: dict[str, FeatureSource],
                 device: torch.device, stop: StopFlag | None = None, faults: dict[str, Any] | None = None,
                 tensorboard=None, world: World | None = None):
        self.cfg, self.paths, self.data, self.features, self.device = cfg, paths, data, features, device
        self.stop = stop or StopFlag()
        self.faults = faults or {}
        self.tb = tensorboard
        self.dtype = amp_dtype(cfg, device)
        self.train_data = data.splits["train"]
        self.world = world or World()
        self.fsdp = self.world.active and cfg.train.parallel == "fsdp"

        torch.manual_seed(cfg.train.seed)
        with device:  # initialise on the device itself (a 730M init on the CPU takes many seconds)
            self.model = RedHeartNet(cfg.model)
        self.param_counts = count_parameters(self.model)
        self.lr = cfg.train.lr
        self.memory_profile = memory.data_profile(
            self.train_data.lengths.tolist(), self.train_data.head_counts(),
            sum(f.flat.numel() * f.flat.element_size() for f in features.values() if f.cached))
        self.swap, checkpointing, why = plan_memory(cfg, device, self.param_counts["total"], self.fsdp,
                                                    self.memory_profile, self._measure_heaviest)
        if checkpointing and not cfg.model.activation_checkpointing:
            self.set_checkpointing(True)
        if self.swap:
            log.info("Dynamic Swap Manager on: optimizer state and update in pinned CPU memory (%s)", why)
        if self.fsdp:  # before the optimizer, which must hold the sharded parameters
            shard_model(self.model, Block)
            log.info("FSDP: weights, gradients and optimizer state sharded across %d processes", self.world.size)
        self.optimizer = build_optimizer(self.model, cfg, self.lr, device, self.swap)
        eff = cfg.effective_batch
        self.steps_per_epoch = math.ceil(len(self.train_data) / eff)
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.scheduler = warmup_cosine(self.optimizer, self.total_steps, cfg.train.warmup_ratio,
                                       cfg.train.min_lr_ratio)
        self.ema = None
        if cfg.tech.ema_decay > 0:
            ema_dev = "cpu" if cfg.tech.ema_device == "cpu" or self.swap else device
            self.ema = EMA(self.model, cfg.tech.ema_decay, cfg.tech.ema_warmup, ema_dev)

        self.epoch = 0  # completed epochs
        self.step_in_epoch = 0  # optimizer steps done in the current epoch
        self.global_step = 0
        self.micro_batch = cfg.train.micro_batch
        self.micro_batch_tokens = cfg.train.micro_batch_tokens
        self.lowp = None
        if use_bf16_weights(cfg, device, self.dtype, self.swap) and not self.fsdp:  # FSDP: weights gathered per forward
            self.lowp = LowPrecisionCopies(self.model, torch.bfloat16)
            log.info("bf16 weight copies on (%.2f GiB, cast once per optimizer step); weight gradients "
                     "summed in fp32 %s", self.lowp.nbytes / 2**30,
                     "by the matrix product (fused)" if self.lowp.fused else "after a bf16 product")
        # several processes (DDP): gradients live in one flat buffer, all-reduced in place
        self.flat_grads = None
        if self.world.active and not self.fsdp:  # buckets within one module: a head without targets is left out
            named = list(self.model.named_parameters())
            self.flat_grads = FlatGrads([p for _, p in named], groups=[n.split(".", 1)[0] for n, _ in named])
        # and on GPUs each bucket's all-reduce starts when the last backward has completed it
        self.ready = None
        if self.flat_grads is not None and device.type == "cuda" and cfg.train.overlap_grad_reduce:
            self.ready = GradReadiness(self.flat_grads)
        self.packing = use_packing(cfg)
        self.graphs = None
        if use_cuda_graphs(cfg, device) and not self.checkpointing and not self.fsdp:
            self.graphs = GraphedMicroSteps(self.model, cfg.tech, cfg.train.head_weights, self.dtype,
                                            cfg.model.max_tokens, rows_multiple=PACKED_ROWS_MULTIPLE * self.packing,
                                            ready=self.ready)
        self.varlen = self.packing and use_varlen_attention(cfg, device, self.dtype, self.graphs is not None)
        if self.ready is not None:
            log.info("gradient all-reduce overlapped with the backward: each of %d buckets is summed once the "
                     "last micro-batch's backward has written it%s", len(self.flat_grads.buckets),
                     " (event nodes in the CUDA graphs)" if self.graphs is not None else "")
        if self.packing:
            rows = f" (CUDA graphs: rows made up to a multiple of {PACKED_ROWS_MULTIPLE})" if self.graphs else ""
            attention = ("within each text's segment of the rows (FlashAttention varlen)" if self.varlen
                         else "in the padded layout")
            log.info("sequence packing on: the texts of a micro-batch share rows in the token-wise layers%s; "
                     "attention %s", rows, attention)
        if cfg.train.compile:
            cpp = use_cpp_wrapper(cfg, device)
            compile_blocks(self.model, cpp_wrapper=cpp)
            log.info("layers compiled (torch.compile, %s wrapper)", "C++" if cpp else "Python")
        self.history: list[dict[str, Any]] = []
        self._annotate = False  # each micro-batch annotated for the profiler (`annotating`)
        self.epoch_stats = StepStats()
        self.bad_steps_in_row = 0
        self.bad_steps_total = 0
        self._unchecked: UncheckedStep | None = None  # the last step, while its check is on the device
        self._ranks_defer = True  # several ranks defer their checks only all together (see defers_checks)
        if self.world.active:
            self._ranks_defer = not any_rank(not self.defers_checks(), self.world)
        if self.defers_checks():
            log.info("finite checks deferred: a bad step is skipped on the device, and the host reads "
                     "each step's check while the next step's work is queued")
        self.oom_events: list[dict[str, Any]] = []
        self.memory_samples: list[dict[str, float]] = []
        self.memory_probe: dict[str, Any] | None = None  # the largest micro-batch search (train-local)
        self.sweep_result: dict[str, Any] | None = None
        self.pins: set[str] = set()
        self.finished = False
        self._epoch_t0 = time.time()
        self._stop_agreed = False  # any rank asked to stop, as of the last step read (`_read_summed`)
        # whether a stop request ends a step between its micro-batches (`StepAbandoned`): in
        # training proper, by one process (several ranks stop together, after a step)
        self.abandonable = False
        # the weights are still those the seed gave (a state of global step 0 then keeps none)
        self.initial_weights = True
        self._in_step = False  # inside a training step's forward and backward (`_accumulate`)
        if device.type == "cpu" and not cfg.train.compile:
            self._check_stop_per_layer()
        # epoch-end resume states written from a thread (train.async_save)
        self.async_save = cfg.train.async_save == "on" or (cfg.train.async_save == "auto" and device.type == "cuda")
        self._saver = ThreadPoolExecutor(1, thread_name_prefix="redheart-save")  # a thread once used
        self._pending: Future | None = None
        self._save_pending = False
        self.last_resume_path: str | None = None
        # the bf16 matrix-product rate of this GPU, measured once: the denominator of MFU
        self.peak_tflops = measure_peak_tflops(device) if device.type == "cuda" else None
        torch.manual_seed(cfg.train.seed + 1 + self.world.rank)  # the dropout stream of training proper

    # ------------------------------------------------------------------ one optimizer step

    def _stop_requested_by_test(self, *_) -> None:
        self.stop.requested, self.stop.signal_name = True, "a test's stop request"

    def _check_stop_per_layer(self) -> None:
        """On the CPU a micro-batch of a large preset takes a minute (730m on two cores): a stop
        request is also met in its forward and backward, at every Transformer layer (a forward
        hook, and a gradient hook on the layer's output), where it leaves the step as between
        micro-batches (`StepAbandoned`). The hooks read a flag; they change no number."""

        def check(*_):
            if self._in_step and self.abandonable and self.stop.requested:
                raise StepAbandoned()

        def after_layer(_module, _args, out):
            check()
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(check)

        for m in self.model.modules():
            if isinstance(m, Block):
                m.register_forward_hook(after_layer)

    def accumulate(self, step: list[int]) -> dict[str, torch.Tensor]:
        """Forward and backward over one optimizer step's samples (this rank's share), cut into
        micro-batches; OOM errors are retried with a smaller micro-batch on the same samples."""
        counts = self.train_data.head_counts(step)
        self._step_counts, self._step_heads = counts, self.towers_run(counts)
        lengths = self.train_data.lengths
        every = self._shares(step)  # every rank's, so FSDP knows the busiest
        mine = every[self.world.rank]
        rng = capture_rng()  # for a retry after an OOM and for a step abandoned by a stop request
        attempt = 0
        while True:
            try:
                mbs = micro_batches(mine, lengths, self.micro_batch, self.micro_batch_tokens)
                own = len(mbs)
                if self.fsdp:  # every forward and backward gathers weights from all ranks: all
                    # run as many micro-batches as the busiest rank, extra ones with zero loss weight
                    busiest = max(len(micro_batches(p, lengths, self.micro_batch, self.micro_batch_tokens))
                                  for p in every)
                    mbs += [step[:1]] * (busiest - own)
                self._in_step = True
                try:
                    return self._accumulate(mbs, own, counts, attempt)
                finally:
                    self._in_step = False
            except torch.OutOfMemoryError as exc:
                attempt += 1
                self._recover_from_oom(exc, attempt)
                restore_rng(rng)
            except StepAbandoned:
                self.zero_grad()
                restore_rng(rng)
                raise

    def _shares(self, step: list[int]) -> list[list[int]]:
        """Every rank's samples of the step (`shares`): the step cut into micro-batches of the
        configured size (the same on every rank, whatever an out-of-memory retry did to one
        rank's), dealt out by what each costs the token-wise layers."""
        return shares(step, self.world.size, self.train_data.lengths, self.cfg.train.micro_batch,
                      self.cfg.train.micro_batch_tokens, self._micro_batch_cost)

    def _micro_batch_cost(self, mb: list[int]) -> int:
        """The tokens the token-wise layers process for this micro-batch as it will run: rows x
        width, with R-Drop's doubled batch, packed rows (made up for the graphs) and the graphs'
        bucketed width. A micro-batch also costs fixed work (launches, towers), but every rank is
        dealt as many micro-batches (within one), so that part is even anyway."""
        lens = [int(self.train_data.lengths[i]) for i in mb]
        width = self.graphs.width(max(lens)) if self.graphs is not None else max(lens)
        return micro_batch_tokens(lens, self.cfg.tech.rdrop_alpha > 0, width, self.packing,
                                  self.graphs.rows_multiple if self.graphs is not None else 0)

    def _accumulate(self, mbs: list[list[int]], own: int, counts: dict[str, int],
                    attempt: int) -> dict[str, torch.Tensor]:
        """Forward and backward over the micro-batches `mbs`. Those from index `own` on are FSDP's
        fillers: their loss counts zero times, but their backward reaches the same parameters as
        a real one's, so every rank runs the same collectives."""
        tech, weights = self.cfg.tech, self.cfg.train.head_weights
        source, lengths = self.features["train"], self.train_data.lengths
        inv = inverse_counts(counts, self.device) if self.graphs is not None else None
        heads = self._step_heads
        if self.lowp is not None:
            self.lowp.refresh()  # the weights of this step, cast once
        # One host-to-device copy of every index of the step; micro-batches slice it on the device.
        idx_all = to_device([i for mb in mbs for i in mb], self.device, torch.long) if source.cached else None
        parts_sum: dict[str, torch.Tensor] = {}
        start = 0
        if self.ready is not None:  # nothing of this step's backward marked yet
            self.ready.begin(mark=False)
        for n, mb in enumerate(mbs):
            if self.abandonable:  # a stop request is honoured here, within a micro-batch's time
                if self.faults.get("stop_at_micro_batch") == [self.global_step + 1, n]:  # REDHEART_FAULTS
                    self._stop_requested_by_test()
                if self.stop.requested:
                    raise StepAbandoned()
            if self.faults.get("oom_at_step") == self.global_step and attempt < self.faults.get("oom_attempts", 1):
                raise torch.OutOfMemoryError("CUDA out of memory (injected by a test)")
            lens = [int(lengths[i]) for i in mb]
            if idx_all is not None:
                idx = idx_all[start:start + len(mb)]
                states, keep = source.gather(idx, max(lens))
                tgt = source.targets_of(idx)
            else:
                states, batch = source(mb)
                keep = batch.keep.to(self.device, non_blocking=True)
                tgt = {k: v.to(self.device, non_blocking=True) for k, v in batch.targets.items()}
            start += len(mb)
            last = n == len(mbs) - 1  # only its backward marks the buckets (the all-reduce follows it)
            with (record_function(f"{MICRO_BATCH}{len(mb)} texts, {self._micro_batch_cost(mb)} tokens")
                  if self._annotate else nullcontext()):  # a profiled step: what each micro-batch costs
                if self.graphs is not None:
                    parts = self.graphs(states, keep, tgt, inv, lens, heads, last=last)
                else:
                    if self.ready is not None:
                        self.ready.begin(mark=last)
                    packing = plan_packing(lens, tech, self.device, segments=self.varlen) if self.packing else None
                    loss, parts = forward_loss(self.model, states, keep, min(lens) != max(lens), tgt, counts,
                                               tech, weights, self.dtype, packing=packing, heads=heads)
                    if n >= own:
                        (loss * 0.0).backward()
                        continue
                    if self.faults.get("stop_in_backward") == [self.global_step + 1, n]:  # REDHEART_FAULTS
                        loss.register_hook(self._stop_requested_by_test)
                    loss.backward()
            for k, v in parts.items():
                parts_sum[k] = parts_sum[k] + v if k in parts_sum else v
        return parts_sum

    def towers_run(self, counts: dict[str, int]) -> list[str] | None:
        """The towers a training step runs (None: all four): the heads with targets in the step.
        Another head's loss is left out (losses.py), so its tower's forward would be wasted and
        it runs no backward. CUDA graphs are captured per set of towers."""
        return [h for h, c in counts.items() if c > 0] or None

    def _measure_heaviest(self) -> float | None:
        """Peak GPU memory (GiB) of one forward and backward of the heaviest micro-batch the
        estimate expects (`memory.heaviest_micro_batch`), as this run computes it (precision,
        R-Drop, packing, the towers with targets; eager layers, which keep a little more than
        compiled ones), with the AdamW moments and the EMA the run adds later held in reserve;
        None if it runs out of memory."""
        cfg, device = self.cfg, self.device
        lengths = self.train_data.lengths.tolist()
        packed = use_packing(cfg)
        tokens = memory.heaviest_micro_batch(lengths, cfg.train.micro_batch, cfg.model.max_tokens, packed)
        idx = heaviest_texts(lengths, cfg.train.micro_batch, tokens)
        params = self.param_counts["total"]
        reserve = 8 * params + (4 * params if cfg.tech.ema_decay > 0 and cfg.tech.ema_device == "same" else 0)
        varlen_ok = packed and cfg.train.packed_attention != "padded" and varlen.available(device, self.dtype)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            ballast = torch.empty(reserve, dtype=torch.uint8, device=device)  # noqa: F841 (held, not read)
            states, batch = self.features["train"](idx)
            keep = batch.keep.to(device)
            tgt = {k: v.to(device) for k, v in batch.targets.items()}
            lens = [int(lengths[i]) for i in idx]
            counts = self.train_data.head_counts(idx)
            packing = plan_packing(lens, cfg.tech, device, segments=varlen_ok) if packed else None
            self.model.train()
            loss, _ = forward_loss(self.model, states, keep, min(lens) != max(lens), tgt, counts, cfg.tech,
                                   cfg.train.head_weights, self.dtype, packing=packing, heads=self.towers_run(counts))
            loss.backward()
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) / 2**30
        except torch.OutOfMemoryError:
            return None
        finally:
            self.model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()

    @property
    def checkpointing(self) -> bool:
        return any(getattr(m, "checkpointing", False) for m in self.model.modules())

    def set_checkpointing(self, on: bool) -> None:
        from redheart.model.network import Stack

        for m in self.model.modules():
            if isinstance(m, Stack):
                m.checkpointing = on

    def enable_swap(self) -> None:
        """Move the optimizer (and EMA) to CPU memory mid-run, keeping their exact state."""
        state, sched = self.optimizer.state_dict(), self.scheduler.state_dict()
        self.optimizer = None
        gc.collect()
        self.optimizer = build_optimizer(self.model, self.cfg, self.lr, self.device, swap=True)
        self.optimizer.load_state_dict(state)
        self.scheduler = warmup_cosine(self.optimizer, self.total_steps, self.cfg.train.warmup_ratio,
                                       self.cfg.train.min_lr_ratio)
        self.scheduler.load_state_dict(sched)
        if self.ema is not None and self.ema.device.type != "cpu":
            self.ema.move_to(torch.device("cpu"))
        self.set_checkpointing(True)
        if self.graphs is not None:
            self.graphs.reset()
            self.graphs = None
        if self.lowp is not None:  # memory first: back to plain autocast
            self.lowp.release()
            self.lowp = None
        self.swap = True
        torch.cuda.empty_cache()

    def zero_grad(self) -> None:
        """Clear the gradients; in place while CUDA graphs or the bf16 copies' fused accumulation
        hold their buffers, else set to None."""
        if self.graphs is not None or self.lowp is not None or self.flat_grads is not None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def _recover_from_oom(self, exc: Exception, attempt: int) -> None:
        self.settle()  # the swap manager may rebuild the optimizer and schedule: the last step first
        if self.graphs is not None:
            self.graphs.reset()
        self.zero_grad()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        before = self.micro_batch
        event = {"step": self.global_step, "epoch": self.epoch + 1, "attempt": attempt,
                 "micro_batch_before": before, "error": str(exc).splitlines()[0][:200],
                 "memory": memory.sample(self.device)}
        action, why = self._oom_action(before, attempt)
        if action == "retry":
            self.micro_batch = max(1, before // 2)
            self.micro_batch_tokens //= 2
            event["action"] = f"retry with micro-batch {self.micro_batch} (accumulation x{before // self.micro_batch})"
            event["micro_batch_after"] = self.micro_batch
            self.oom_events.append(event)
            log.warning("out of memory at step %d: %s", self.global_step, event["action"])
            return
        if action == "swap":
            self.enable_swap()
            event["action"] = "Dynamic Swap Manager on (optimizer state to CPU memory), activation checkpointing on"
            event["micro_batch_after"] = before
            self.oom_events.append(event)
            log.warning("out of memory at step %d with micro-batch %d: %s", self.global_step, before, event["action"])
            return
        event["action"] = "stop"
        event["micro_batch_after"] = before
        self.oom_events.append(event)
        # Under several processes the others are waiting in the gradient all-reduce: no collective
        # save is possible; torchrun stops them when this rank exits, the last state stays.
        path = self.save_resume_state() if not self.world.active else None
        raise TrainingStopped(
            f"out of memory at step {self.global_step} with micro-batch {before}: {why}. "
            f"Resume with a smaller model (--preset), --set model.activation_checkpointing=true, or "
            f"{'more GPUs' if self.fsdp else '--set memory.swap=on'}: --resume {path or 'latest'}", path, code=4)

    def _oom_action(self, before: int, attempt: int) -> tuple[str, str]:
        """What an out-of-memory error at micro-batch `before` leads to: "retry" (half the
        micro-batch, the same samples), "swap" (the Dynamic Swap Manager on), or "stop" and why."""
        # Under FSDP the other ranks wait in a collective of the step this rank left: no retry.
        if before > 1 and attempt <= self.cfg.memory.max_oom_retries and not self.fsdp:
            return "retry", ""
        if not self.swap and self.cfg.memory.swap != "off" and self.device.type == "cuda" and not self.fsdp:
            if not (self.world.active and self.defers_checks()):
                return "swap", ""
            # the swap manager's update needs the synchronous check: this rank would read its
            # steps (and the others' stop requests) a step before the other ranks do
            return "stop", "one rank cannot turn the swap manager on alone while the ranks defer their checks"
        return "stop", "a rank cannot retry alone under FSDP" if self.fsdp else "nothing smaller fits"

    def apply_update(self, optimizer: torch.optim.Optimizer, parts: dict[str, torch.Tensor],
                     defer: bool = False) -> bool | torch.Tensor:
        """Clip and step `optimizer` unless the loss or gradient is not finite; clear gradients.
        Returns whether the step was applied; with `defer` (a fused AdamW) the check stays on the
        device, where AdamW skips its own update, and comes back as a tensor: the flag, or with
        several ranks the vector [flag, `sum_scalars`'s sums, counts and stop count].

        A head without targets in this step takes no part in it (no decay, no momentum), as in
        the eager path where its gradients are None; CUDA graphs keep zeros there, so hide them.
        """
        summed = None
        idle = {h for h, c in getattr(self, "_step_counts", {}).items() if c == 0}  # the same on every rank
        if self.world.active:  # every rank holds a part of the step: sum gradients (FSDP has) and loss parts
            if self.flat_grads is not None:  # DDP (FSDP has reduce-scattered them in the backward)
                self.flat_grads.all_reduce(self.world, torch.bfloat16 if self.cfg.train.grad_reduce == "bf16" else None,
                                           skip=idle, ready=self.ready)  # idle: hidden below, never read
            summed = sum_scalars(parts, self.world, self.stop.requested)
        hidden = {p: p.grad for n, p in self.model.named_parameters() if n.split(".", 1)[0] in idle}
        for p in hidden:
            p.grad = None
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.train.clip_norm if self.cfg.train.clip_norm > 0 else float("inf")
        if all(g.get("fused") for g in optimizer.param_groups) and not self.fsdp:  # FSDP: DTensor gradients
            # clip_grad_norm_'s coefficient handed to the fused AdamW, which divides the gradients by
            # it as it reads them (GradScaler's mechanism): one pass over every gradient less
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            optimizer.grad_scale = (clip / (norm + 1e-6)).clamp(max=1.0).reciprocal()
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if is_dtensor(norm):  # under FSDP: the norm over all ranks' shards
            norm = norm.full_tensor()
        loss = parts["loss"] if summed is None else summed[0]  # LOSS_KEYS[0] is the total loss
        ok = torch.isfinite(norm) & torch.isfinite(loss)
        check = ok if summed is None else torch.cat([ok.float().view(1).to(summed.device), summed])
        if defer:
            optimizer.found_inf = (~ok).float()  # fused AdamW: no update, step count kept, on a bad step
            optimizer.step()
            optimizer.found_inf = None
            finite = check
        else:
            if summed is None:
                finite = bool(ok)  # the one host sync of the step
            else:  # the one host sync of the step: the check, which parts exist, any rank's stop
                finite = self._read_summed(check, check.tolist(), parts)
            if finite:
                optimizer.step()
        optimizer.grad_scale = None
        for p, g in hidden.items():
            p.grad = g
        self.zero_grad()
        parts["grad_norm"] = norm.detach().float()
        return finite

    def _read_summed(self, check: torch.Tensor, host: list[float], parts: dict[str, torch.Tensor]) -> bool:
        """Several ranks: from the check vector (`apply_update`) on the device and its copy on the
        host, put the loss parts summed over the ranks into `parts`, note whether any rank asked
        to stop, and return whether the step was applied (the same on every rank)."""
        totals, self._stop_agreed = unpack_scalars(check[1:], host[1 + len(LOSS_KEYS):])
        parts.update(totals)
        return host[0] > 0

    def defers_checks(self) -> bool:
        """Whether steps leave their finite check on the device (`train.finite_check`). Several
        ranks settle a step at the same points (the next step's update, the same log steps: see
        `Progress.quiet`), so they agree on stops and on bad steps in a row as when synchronous;
        so they defer all or none (agreed at the start: one may hold the swap manager, on a GPU
        with less memory)."""
        mode = self.cfg.train.finite_check
        possible = (not self.fsdp and not self.swap and self._ranks_defer
                    and all(g.get("fused") for g in self.optimizer.param_groups)
                    and self.faults.get("no_defer_rank", -1) != self.world.rank)  # REDHEART_FAULTS: a test's
        return possible and (mode == "deferred" or (mode == "auto" and self.device.type == "cuda"))

    def optimizer_step(self, parts: dict[str, torch.Tensor]) -> bool | None:
        """The update of a training step: AdamW, schedule, EMA; a non-finite step is skipped and
        counted. Returns whether it was applied, or None while its check is on the device: then
        `settle` (called by the next step, before its update, and before anything that reads the
        schedule, the EMA or the counts) finishes it. The order of the GPU's work is the same
        either way (the EMA reads the weights before the next update), so are the results."""
        self.settle()
        self.epoch_stats.lrs.append(self.scheduler.get_last_lr()[0])
        finite = self.apply_update(self.optimizer, parts, defer=self.defers_checks())
        if isinstance(finite, torch.Tensor):
            ok, event = finite, None
            if ok.device.type == "cuda":  # copied to the host behind the step's work, not waited for
                ok = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True).copy_(finite, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            self._unchecked = UncheckedStep(self.global_step, parts, ok, event, finite if self.world.active else None)
            return None
        self._step_done(self.global_step, parts, finite)
        return finite

    def settle(self) -> bool | None:
        """Finish the step whose finite check was left on the device, if any: wait for that
        step's end (not for the work queued since), then schedule, EMA and counts. Returns
        whether that step was applied (None: there was none)."""
        u, self._unchecked = self._unchecked, None
        if u is None:
            return None
        if u.event is not None:
            u.event.synchronize()
        finite = bool(u.ok) if u.vector is None else self._read_summed(u.vector, u.ok.tolist(), u.parts)
        self._step_done(u.step, u.parts, finite)
        return finite

    def _step_done(self, step: int, parts: dict[str, torch.Tensor], finite: bool) -> None:
        if finite:
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model, self.optimizer.cpu_of if self.swap else None)
            self.bad_steps_in_row = 0
            self.epoch_stats.add(parts)  # a skipped step's non-finite loss would make the epoch's mean NaN
            self.epoch_stats.steps += 1
        else:
            self.bad_steps_total += 1
            self.bad_steps_in_row += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all)",
                        step, self.bad_steps_in_row, self.bad_steps_total)

    # ------------------------------------------------------------------ epochs

    def fit(self, progress=None) -> list[dict[str, Any]]:
        try:
            return self._fit(progress)
        except BaseException:
            self.wait_for_save(collective=False)  # a background write completes before the error goes on
            raise
        finally:
            self.abandonable = False

    def _fit(self, progress=None) -> list[dict[str, Any]]:
        cfg = self.cfg
        self.abandonable = not self.world.active
        while self.epoch < cfg.train.epochs:
            epoch = self.epoch + 1
            plan = epoch_plan(self.train_data.lengths, cfg.effective_batch, cfg.train.seed, epoch,
                              cfg.data.length_group_steps)
            if self.step_in_epoch == 0:
                self.epoch_stats = StepStats()
                self._epoch_t0 = time.time()
            bar = progress(epoch, len(plan), self.step_in_epoch) if progress else None
            for i in range(self.step_in_epoch, len(plan)):
                step = plan[i]
                self.model.train()
                try:
                    if self.global_step + 1 == cfg.train.profile_step:
                        parts, applied = self._profiled_step(step)
                    else:
                        parts, applied = self._train_step(step)
                except StepAbandoned:
                    path = self.save_resume_state()
                    raise TrainingStopped(f"stopped by {self.stop.signal_name} after step {self.global_step} (epoch "
                                          f"{epoch}, step {self.step_in_epoch}/{len(plan)}); step {self.global_step + 1}, "
                                          f"left midway, is redone on resume", path, code=75) from None
                self.global_step += 1
                self.step_in_epoch = i + 1
                self.epoch_stats.samples += len(step)
                step_lengths = self.train_data.lengths[step]
                self.epoch_stats.tokens += int(step_lengths.sum())
                self.epoch_stats.flops += train_flops(cfg.model, step_lengths.tolist(), cfg.tech.rdrop_alpha > 0,
                                                      not self.features["train"].cached, self._step_heads)
                if cfg.memory.monitor:
                    self.memory_samples.append({"step": self.global_step, **memory.sample(self.device)})
                if bar is not None:
                    if applied is None and bar.logs_next():  # the line reads the loss anyway: settle
                        applied = self.settle()
                    bar.step(self, parts, applied is not False)
                if self._unchecked is not None and self.bad_steps_in_row >= cfg.train.max_bad_steps - 1:
                    self.settle()  # one more bad step stops the run: decide at this step, as when synchronous
                if self.bad_steps_in_row >= cfg.train.max_bad_steps:
                    path = self.save_resume_state()
                    raise TrainingStopped(f"{self.bad_steps_in_row} optimizer steps in a row had a non-finite "
                                          f"loss or gradient; the last good state is kept", path, code=5)
                if self.faults.get("crash_at_step") == self.global_step and \
                        self.faults.get("crash_rank", self.world.rank) == self.world.rank:
                    raise RuntimeError(f"crash injected by a test on rank {self.world.rank}")
                if self.faults.get("signal_at_step") == self.global_step and \
                        self.faults.get("signal_rank", self.world.rank) == self.world.rank:
                    self.stop.requested, self.stop.signal_name = True, "a test's signal"  # as SIGTERM would
                if self.faults.get("stop_at_step") == self.global_step:
                    self.stop.requested, self.stop.signal_name = True, "a test's stop request"
                    self._stop_agreed = True
                if self.world.active and self._stop_agreed and not self.stop.requested:
                    self.stop.requested, self.stop.signal_name = True, "a stop request on another rank"
                if self._stop_agreed if self.world.active else self.stop.requested:
                    path = self.save_resume_state()
                    raise TrainingStopped(f"stopped by {self.stop.signal_name} after step {self.global_step} "
                                          f"(epoch {epoch}, step {self.step_in_epoch}/{len(plan)})", path, code=75)
            if bar is not None:
                bar.close()
            self.epoch = epoch
            self.step_in_epoch = 0
            self.finished = self.epoch == cfg.train.epochs
            self.end_of_epoch(len(plan))
            # a signal while closing the epoch; or its resume state not written (the run's last too)
            if any_rank(self.stop.requested, self.world) and (
                    not self.finished or any_rank(self.stop.write_failure is not None, self.world)):
                self.wait_for_save()
                self.stop.signal_name = self.stop.signal_name or "a stop request on another rank"
                raise TrainingStopped(f"stopped by {self.stop.signal_name} at the end of epoch {epoch}",
                                      self.last_resume_path, code=75)
        if not self.finished:  # a resumed run that had already finished: record that once
            self.finished = True
            self.save_resume_state()
        self.wait_for_save()
        return self.history

    def _train_step(self, step: list[int]) -> tuple[dict[str, torch.Tensor], bool | None]:
        parts = self.accumulate(step)
        if self.faults:
            self._inject_numeric_fault(parts)
        return parts, self.optimizer_step(parts)

    @contextmanager
    def annotating(self) -> Iterator[None]:
        """Inside, each micro-batch is annotated for the profiler with its texts and tokens
        (`redheart.train.profile.micro_batch_times`)."""
        self._annotate = True
        try:
            yield
        finally:
            self._annotate = False

    def _profiled_step(self, step: list[int]) -> tuple[dict[str, torch.Tensor], bool | None]:
        """`train.profile_step`: this step under torch.profiler, its summary and trace written
        beside the logs by every rank (each its own files)."""
        from redheart.train.profile import profiled

        name = f"profile_step{self.global_step + 1}_rank{self.world.rank}"
        with self.annotating(), profiled(self.device, self.paths.logs / f"{name}.trace.json") as summary:
            out = self._train_step(step)
        ckio.atomic_write_text(json.dumps(summary, indent=1), self.paths.logs / f"{name}.json")
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
        log.info("step %d profiled: %.1f ms, %s; %s", self.global_step + 1, summary["wall_ms"], what,
                 self.paths.logs / f"{name}.json")
        return out

    def _inject_numeric_fault(self, parts: dict[str, torch.Tensor]) -> None:
        """Test hooks (REDHEART_FAULTS): {"nan_at_steps": [3]} makes the loss of global step 3 (as
        the log counts them) NaN; {"inf_grad_at_steps": [3]} puts an Inf into a gradient."""
        if self.global_step in self.faults.get("nan_at_steps", ()):
            parts["loss"] = parts["loss"] * float("nan")
        if self.global_step in self.faults.get("inf_grad_at_steps", ()):
            next(p.grad for p in self.model.parameters() if p.grad is not None).fill_(float("inf"))

    def end_of_epoch(self, steps: int) -> dict[str, Any]:
        """Validate, write the epoch's metrics record, TensorBoard scalars, snapshot and resume
        state (`steps`: the epoch's optimizer steps, for going back before its end)."""
        self.settle()
        cfg = self.cfg
        seconds = time.time() - self._epoch_t0
        tflops = self.epoch_stats.flops / max(seconds, 1e-9) / 1e12  # model FLOPs done per second
        train = self.epoch_stats.means()
        val, collapsed = validation(self.model, self.features["val"], cfg, self.dtype, self.world)
        val_ema = None
        if self.ema is not None:
            with self.ema.applied(self.model):
                val_ema = evaluate(self.model, self.features["val"], cfg, self.dtype, self.world)
        record = {
            "epoch": self.epoch, "global_step": self.global_step, "lr": self.scheduler.get_last_lr()[0],
            "lr_steps": list(self.epoch_stats.lrs),
            "micro_batch": self.micro_batch, "train": train, "val": val, "val_ema": val_ema,
            "collapsed": collapsed,  # head -> why its validation predictions collapsed (none: {})
            "samples": self.epoch_stats.samples,  # this epoch's, across interruptions (skipped steps' too)
            "seconds": seconds, "samples_per_s": self.epoch_stats.samples / max(seconds, 1e-9),
            "tokens_per_s": self.epoch_stats.tokens / max(seconds, 1e-9),
            "tflops": tflops, "mfu": tflops / (self.peak_tflops * self.world.size) if self.peak_tflops else None,
            "bad_steps": self.bad_steps_total, "memory": memory.sample(self.device),
            "timestamp": iso_now(),
        }
        self.history.append(record)
        failed_before = len(ckio.write_failures())
        if self.world.main:  # every rank holds the same record; one writes it
            try:
                self.write_metrics()
            except ckio.CheckpointError as exc:
                log.error("metrics record of epoch %d not written: %s", self.epoch, exc)
        log.info("epoch %d/%d: train loss %.4f | val loss %.4f%s | %.1f samples/s%s | %.0fs", self.epoch,
                 cfg.train.epochs, train.get("loss", float("nan")), val["loss"],
                 f" | ema val loss {val_ema['loss']:.4f}" if val_ema else "", record["samples_per_s"],
                 f" | MFU {record['mfu']:.1%}" if record["mfu"] is not None else "", seconds)
        log.info("  val: %s", "  ".join(f"{k}={v:.4f}" for k, v in val.items() if k != "loss"))
        for head, why in collapsed.items():
            log.warning("epoch %d: the %s head has collapsed on validation: %s", self.epoch, head, why)
        failed = lambda: len(ckio.write_failures()) > failed_before  # noqa: E731 - this epoch's files
        if self.tb is not None and not failed():
            self.tb.epoch(record)
        if self.epoch % cfg.train.save_every == 0 or self.epoch == cfg.train.epochs:
            weights = self.snapshot_weights() if self.world.main or self.fsdp else None  # FSDP: all gather
            if self.world.main and not failed():
                self.save_snapshot(record, weights)
        if any_rank(failed(), self.world):
            self._unclose_epoch(record, steps)
        self.save_resume_state(background=self.async_save and not self.swap)  # swap manager: host memory is short
        return record

    def _unclose_epoch(self, record: dict[str, Any], steps: int) -> None:
        """The epoch's own files (metrics record, TensorBoard, snapshot) could not all be
        written: back to the state after its last step, saved if it can be, so that a resume
        redoes the epoch's end (validation, metrics, snapshot: the same numbers), then stop."""
        self.history.remove(record)
        self.epoch, self.step_in_epoch, self.finished = self.epoch - 1, steps, False
        path = self.save_resume_state()
        raise TrainingStopped(f"stopped at the end of epoch {self.epoch + 1} (global step {self.global_step}): its "
                              f"files could not all be written; the state after its last step is kept, and a resume "
                              f"redoes the epoch's end", path, code=75)

    def write_metrics(self) -> None:
        text = "".join(json.dumps(r, allow_nan=True) + "\n" for r in self.history)
        ckio.atomic_write_text(text, self.paths.metrics_file)

    # ------------------------------------------------------------------ checkpoints

    def model_state(self) -> dict[str, torch.Tensor]:
        """The whole model's weights, plain tensors on the CPU. Under FSDP every rank must call
        it (the shards are gathered) and only rank 0 gets them."""
        return {k: v.detach().cpu() for k, v in gathered(self.model.state_dict(), self.world).items()
                if v is not None}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load whole weights (every rank holds them; under FSDP each keeps its shards); the EMA
        starts anew from them, and the swap manager's CPU master weights follow them."""
        like = self.model.state_dict()
        self.model.load_state_dict({k: shard_like(v, like.get(k, v)) for k, v in weights.items()})
        self.initial_weights = False
        if isinstance(self.optimizer, SwapAdamW):
            self.optimizer.sync_from_model()
        if self.ema is not None:
            self.ema.reset(self.model)

    def snapshot_weights(self) -> dict[str, torch.Tensor]:
        """What an epoch snapshot keeps (raw or EMA weights, whole); under FSDP see `model_state`."""
        dtype = torch.bfloat16 if self.cfg.train.snapshot_dtype == "bf16" else torch.float32
        if self.cfg.train.snapshot_weights == "ema" and self.ema is not None:
            src = gathered(self.ema.weights(), self.world)
        else:
            src = self.model_state()
        return {k: v.detach().to("cpu", dtype) for k, v in src.items() if v is not None}

    def save_snapshot(self, record: dict[str, Any], weights: dict[str, torch.Tensor]) -> str | None:
        lr = record["lr"]
        # the name carries the run's peak LR (the sweep's choice or train.lr), as in the guide's
        # `checkpoint_epoch_0002_lr_0.000100_...`; the scheduled LR at the epoch's end is in `lr`
        path = self.paths.snapshot_path(self.epoch, self.lr)
        metrics = {"loss": record["val"]["loss"], "train_loss": record["train"].get("loss"),
                   "train": record["train"],  # every component of the training loss (task, rdrop, heads)
                   **{k: v for k, v in record["val"].items() if k != "loss"}}
        if record["val_ema"]:
            metrics["ema"] = record["val_ema"]
        ckpt = {"kind": "snapshot", "format": ckio.FORMAT_VERSION, "run_id": self.paths.run_id,
                "epoch": self.epoch, "global_step": self.global_step, "lr": lr,
                "weights": self.cfg.train.snapshot_weights, "model_state": weights,
                "metrics": metrics, "config": self.cfg.to_dict(), "param_counts": self.param_counts}
        try:
            info = ckio.atomic_save(ckpt, path)
        except ckio.CheckpointError as exc:
            log.error("epoch %d snapshot not saved: %s", self.epoch, exc)
            return None
        try:
            try:
                entries = ckio.read_metadata(self.paths.checkpoints)
            except ckio.CheckpointError as exc:
                log.error("%s", exc)
                entries = ckio.rebuild_metadata(self.paths.checkpoints)
            # an epoch redone after a crash has the same file name: its old entry goes
            entries = [e for e in entries if e["path"] != str(path)]
            entries.append({"epoch": self.epoch, "lr": lr, "path": str(path), "file": path.name,
                            "timestamp": iso_now(), "sha256": info["sha256"], "size_bytes": info["size"],
                            "run_id": self.paths.run_id, "global_step": self.global_step,
                            "weights": self.cfg.train.snapshot_weights, "metrics": metrics})
            self.prune(entries)
        except ckio.CheckpointError as exc:
            log.error("metadata.json not updated (%s is on disk but not listed): %s", path.name, exc)
            return None
        log.info("saved %s (%.1f MiB)", path.name, info["size"] / 2**20)
        return str(path)

    def prune(self, entries: list[dict[str, Any]]) -> None:
        """Apply the retention limit to the epoch snapshots, never touching pinned ones."""
        own = [e for e in entries if e.get("run_id") == self.paths.run_id]
        keep_epochs = pinned_epochs(self.history, self.cfg)
        self.pins = {e["path"] for e in own if e["epoch"] in keep_epochs}
        doomed = set(select_deletions(entries, self.cfg.train.keep_checkpoints, self.pins))
        if len(self.pins) > self.cfg.train.keep_checkpoints:
            log.warning("%d snapshots are pinned by Sweet Spot, more than keep_checkpoints=%d: all kept",
                        len(self.pins), self.cfg.train.keep_checkpoints)
        ckio.write_metadata(self.paths.checkpoints, [e for e in entries if e["path"] not in doomed])
        for p in doomed:  # after the list is written, so that it never names a deleted file
            try:
                Path(p).unlink(missing_ok=True)
                log.info("retention: deleted %s", p)
            except OSError as exc:
                log.warning("retention: could not delete %s: %s", p, exc)

    def resume_state(self, rngs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything to continue exactly, as plain tensors in the layout of one process (the
        optimizer's as `torch.optim` writes it): it resumes under any mode and number of
        processes. Under FSDP every rank must call it; rank 0's alone is whole."""
        self.settle()
        rngs = rngs or [capture_rng()]
        # Before the first optimizer step the weights are the seed's (and the EMA theirs, AdamW's
        # moments not yet made): the state keeps their fingerprint instead of them, so that a stop
        # then (the first 730m step on a CPU takes many minutes) saves in moments, not in minutes
        # of writing gigabytes; `restore` rebuilds them.
        initial = (self.global_step == 0 and self.initial_weights and not self.swap and not self.fsdp
                   and not self.optimizer.state)
        ema = None
        if self.ema is not None:
            ema = ({"shadow": {}, "num_updates": 0, "decay": self.ema.decay, "warmup": self.ema.warmup} if initial
                   else gathered(self.ema.state_dict(), self.world))
        extra = {"weights": "initial", "initial_weights": {"seed": self.cfg.train.seed, "device": self.device.type,
                                                           "fingerprint": weights_fingerprint(self.model)}} if initial else {}
        return {
            "kind": "resume", "format": ckio.FORMAT_VERSION, "run_id": self.paths.run_id,
            "config": self.cfg.to_dict(), "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "micro_batch": self.micro_batch, "lr": self.lr,
            "model_state": {} if initial else self.model_state(), **extra,
            "optimizer": gathered(self.optimizer.state_dict(), self.world), "scheduler": self.scheduler.state_dict(),
            "ema": ema,
            "rng": rngs[0], "rng_ranks": rngs, "history": self.history, "epoch_stats": self.epoch_stats.state(),
            "bad_steps_total": self.bad_steps_total, "bad_steps_in_row": self.bad_steps_in_row,
            "oom_events": self.oom_events, "sweep": self.sweep_result, "finished": self.finished,
            "epoch_elapsed_s": time.time() - self._epoch_t0,  # training time of the epoch so far
            "param_counts": self.param_counts,
        }

    def save_resume_state(self, background: bool = False) -> str | None:
        """Write a resume state and register it; the registry keeps the newest
        `train.resume_states_kept`. On failure the previous states stay as they were and None
        comes back (also in `last_resume_path`). Under several processes every rank calls it:
        rank 0 writes, with every rank's RNG streams, and all get its answer.

        With `background`, rank 0 writes a copy of the state from a thread while training goes
        on; `wait_for_save` joins it (every later save, the end of `fit` and any stop wait first),
        so states are written one at a time and in order."""
        self.wait_for_save()
        rngs = all_objects(capture_rng(), self.world)
        state = self.resume_state(rngs) if self.world.main or self.fsdp else None  # FSDP: all gather
        if background:
            if self.world.main:  # training goes on changing the originals: the thread gets copies
                self._pending = self._saver.submit(self._write_in_background, detached_copy(state))
            self._save_pending = True
            return None
        path = self._write_resume_state(state) if self.world.main else None
        self.last_resume_path = broadcast(path, self.world)
        return self.last_resume_path

    def wait_for_save(self, collective: bool = True) -> None:
        """Join a background write, if any; its path becomes `last_resume_path` (on every rank
        when `collective`; False on the way out of an error, where ranks may be anywhere)."""
        if not self._save_pending:
            return
        path = self._pending.result() if self._pending is not None else None
        self._pending, self._save_pending = None, False
        self.last_resume_path = broadcast(path, self.world) if collective else path

    def _write_in_background(self, state: dict[str, Any]) -> str | None:
        t0 = time.time()
        try:
            path = self._write_resume_state(state)
        except ckio.CheckpointError as exc:  # reported (a failed write stops the run), the previous state kept
            log.error("resume state not saved (the previous one is kept): %s", exc)
            return None
        except Exception:  # noqa: BLE001 - reported, and the previous state stays registered
            log.exception("resume state not saved (the previous one is kept)")
            return None
        if path:
            log.info("resume state written in the background: %s (%.1f s)", Path(path).name, time.time() - t0)
        return path

    def _write_resume_state(self, state: dict[str, Any]) -> str | None:
        """Write and register `state`; reads nothing of the trainer that training changes (a
        background write runs while it does)."""
        path = self.paths.resume_path(state["global_step"])
        entry = {"path": str(path), "run_id": self.paths.run_id,
                 **{k: state[k] for k in ("epoch", "step_in_epoch", "global_step", "finished")}}

        def side_file(info: dict[str, Any]) -> None:  # the entry beside the file until it is registered
            entry.update({"sha256": info["sha256"], "size_bytes": info["size"], "timestamp": iso_now()})
            ckio.atomic_write_text(json.dumps({**entry, "path": path.name}) + "\n", sidecar_path(path))

        try:
            ckio.atomic_save(state, path, before_rename=side_file)
        except ckio.CheckpointError as exc:
            sidecar_path(path).unlink(missing_ok=True)
            log.error("resume state not saved (the previous one is kept): %s", exc)
            return None
        entries = [e for e in read_registry(self.paths.root) if e["path"] != str(path) and Path(e["path"]).is_file()]
        entries.append(entry)
        keep = self.cfg.train.resume_states_kept
        old, entries = entries[:-keep], entries[-keep:]
        try:
            write_registry(self.paths.root, entries)
        except ckio.CheckpointError as exc:  # unregistered: the next run would adopt it, but this one goes on
            log.error("resume state not saved (the previous one is kept): %s", exc)
            path.unlink(missing_ok=True)
            sidecar_path(path).unlink(missing_ok=True)
            return None
        sidecar_path(path).unlink(missing_ok=True)
        listed = {e["path"] for e in entries}
        # the states dropped from the list, and this run's states a kill left unregistered
        orphans = [str(p) for p in self.paths.checkpoints.glob(f"resume_state_{self.paths.run_id}_step*.pt")]
        for p in {e["path"] for e in old} | set(orphans):
            if p not in listed:
                Path(p).unlink(missing_ok=True)
                sidecar_path(p).unlink(missing_ok=True)
        return str(path)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly from a resume state (every rank holds it whole)."""
        initial = state.get("weights") == "initial"
        if initial:  # a state of global step 0: the seed's weights, as this trainer built them (`resume_state`)
            rebuilt = rebuild_initial_weights(self.cfg, state["initial_weights"], self.model)
            if rebuilt is not None:
                self.load_weights(rebuilt)
            self.initial_weights = True
        else:
            self.load_weights(state["model_state"])
        oom_events = list(state["oom_events"])
        if not self.swap and not self.fsdp and \
                any(str(e.get("action", "")).startswith("Dynamic Swap Manager") for e in oom_events):
            self.enable_swap()  # an OOM had turned it on: go on as the interrupted run did
        self.optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], self.optimizer))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise ckio.CheckpointError("the resume state has no EMA but the config has tech.ema_decay > 0")
            if not initial:  # (the EMA of the initial weights is those weights: load_weights reset it)
                self.ema.load_state_dict(state["ema"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.micro_batch = int(state["micro_batch"])
        retries = sum(1 for e in oom_events if str(e.get("action", "")).startswith("retry"))
        self.micro_batch_tokens = int(state.get("micro_batch_tokens", self.cfg.train.micro_batch_tokens >> retries))
        self.lr = float(state["lr"])
        self.history = list(state["history"])
        self.epoch_stats = StepStats.from_state(state["epoch_stats"], self.device)
        self.bad_steps_total = int(state["bad_steps_total"])
        self.bad_steps_in_row = int(state["bad_steps_in_row"])
        self.oom_events = oom_events
        self.sweep_result = state.get("sweep")
        self.finished = bool(state["finished"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) == self.world.size:  # the same number of processes: each its own streams
            restore_rng(ranks[self.world.rank])
        else:  # another number of processes: data order is by step, dropout streams start anew
            restore_rng(ranks[0])
            torch.manual_seed(self.cfg.train.seed + 1 + self.world.rank + self.global_step)
            log.warning("resumed with %d process(es), saved with %d: the dropout streams start anew "
                        "(data order and position are kept)", self.world.size, len(ranks))
        # the epoch's samples/s counts the samples and the training time before the stop too
        self._epoch_t0 = time.time() - (float(state.get("epoch_elapsed_s", 0.0)) if self.step_in_epoch else 0.0)

    def set_lr(self, lr: float) -> None:
        """Use a new peak LR (the sweep's choice) before training starts."""
        self.lr = lr
        set_peak_lr(self.optimizer, lr)
        for g in self.optimizer.param_groups:
            g.pop("initial_lr", None)
        self.scheduler = warmup_cosine(self.optimizer, self.total_steps, self.cfg.train.warmup_ratio,
                                       self.cfg.train.min_lr_ratio)
