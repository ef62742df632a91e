"""Several processes (GPUs, or CPU processes with gloo) under `torchrun`: PyTorch's own engine.

Data parallel in the style of DDP: every rank holds the whole model and optimizer, runs its
share of each optimizer step's samples, and the gradients are summed across ranks before the
update. The sum (not DDP's mean) is what the losses need: each rank's loss is already
normalised by the labelled counts of the *whole* step, so the summed gradient equals the
single-process one, whatever the number of ranks. The gradients live in one flat buffer
(`FlatGrads`) and are all-reduced in place in ~100 MB buckets, all launched before any is
awaited; every rank calls it once a step even with no samples of its own (short last step),
so no rank can wait on another forever. On GPUs a bucket's all-reduce starts as soon as the
last micro-batch's backward has written all of its gradients (`GradReadiness`, DDP's overlap
of communication with the backward), also where that backward is a CUDA graph replay.

With `train.parallel=fsdp` PyTorch's FSDP2 shards instead: each rank keeps 1/N of every
weight, gradient and AdamW moment (DTensors), gathers a layer's weights for its forward and
backward, and reduce-scatters the gradients; `shard_model` sets it up. Whatever reads or
writes whole weights (checkpoints) gathers the shards with `gathered` or cuts whole tensors
into them with `shard_like`: the files are the same plain tensors under either mode.
"""
from __future__ import annotations

import bisect
import datetime
import logging
import os
import sys
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map_only

from redheart import heads

BUCKET_BYTES = 100 * 2**20
# Each gradient view of a `FlatGrads` starts at a multiple of this many bytes, as the caching
# allocator aligns every tensor. Packed back to back, a view after a parameter of odd size (a
# head's bias of 7 or 10) is only 4-byte aligned, and cuBLAS then writes its weight gradient
# with slow unaligned kernels (sm80 `..._align2`; on two H200s the 36 such products of a
# 1024-token micro-batch took 2.4 ms against 1.0 for the aligned ones).
GRAD_ALIGN_BYTES = 512
log = logging.getLogger("redheart")


def is_dtensor(t: object) -> bool:
    """Whether `t` is a DTensor (an FSDP shard). torch.distributed.tensor is imported only where
    FSDP is used (it adds about a second to every start); where nothing imported it, no DTensor
    can exist."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def is_fsdp(module: torch.nn.Module) -> bool:
    """Whether `module` is sharded by FSDP2 (`fully_shard`); see `is_dtensor`."""
    mod = sys.modules.get("torch.distributed.fsdp")
    return mod is not None and isinstance(module, mod.FSDPModule)


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def from_env() -> World:
    """The world torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), or a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(rank=int(os.environ.get("RANK", "0")), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def init(world: World, device_type: str, timeout_s: int = 600) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs) with a timeout, so a dead rank ends
    the others with an error instead of a hang."""
    if not world.active or dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs = {}
    if device_type == "cuda":
        kwargs["device_id"] = torch.device("cuda", world.local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


class FlatGrads:
    """Every parameter's gradient as a view of one flat buffer (DDP's `gradient_as_bucket_view`):
    the all-reduce runs in place on slices of it, without first packing each bucket of
    gradients into a new tensor and copying the sums back (for the 730m preset that is 2.9 GB
    written and read twice a step). The views persist: gradients are zeroed in place. Each
    view starts at a multiple of `GRAD_ALIGN_BYTES` (the gaps hold zeros, summed with the rest).

    `groups` (one key per parameter, e.g. its top-level module) keeps each bucket within one
    group, so that a group whose gradients are zero on every rank (a head without targets in
    the step) is left out of the all-reduce: `all_reduce(..., skip=...)`."""

    def __init__(self, params: list[torch.nn.Parameter], bucket_bytes: int | None = None,
                 groups: list[str] | None = None):
        keys = groups if groups is not None else [""] * len(params)
        kept = [(p, k) for p, k in zip(params, keys, strict=True) if p.requires_grad]
        self.params = [p for p, _ in kept]
        dtype = self.params[0].dtype
        if any(p.dtype != dtype for p in self.params):
            raise ValueError(f"FlatGrads: parameters of one dtype only ({sorted({str(p.dtype) for p in self.params})})")
        align = max(1, GRAD_ALIGN_BYTES // self.params[0].element_size())
        offsets, at = [], 0  # each view's start: the end of the one before, rounded up
        for p in self.params:
            offsets.append(at)
            at = -(-(at + p.numel()) // align) * align
        self.flat = torch.zeros(at, dtype=dtype, device=self.params[0].device)
        self.views, spans = [], []  # spans: (group, start, end) of each run of one group
        for (p, key), at in zip(kept, offsets):
            self.views.append(self.flat[at:at + p.numel()].view_as(p))
            p.grad = self.views[-1]
            if spans and spans[-1][0] == key:
                spans[-1][2] = at + p.numel()
            else:
                spans.append([key, at, at + p.numel()])
        step = max(1, (bucket_bytes or BUCKET_BYTES) // self.flat.element_size())
        self._starts, self.groups = [], []  # each bucket's start in the buffer and its group
        view_ends = [at + p.numel() for p, at in zip(self.params, offsets)]
        for key, a, b in spans:
            for s in range(a, b, step):
                i = bisect.bisect_right(offsets, s) - 1
                s = s if s < view_ends[i] else offsets[i + 1]  # a start in a gap moves to the next
                if not self._starts or s != self._starts[-1]:  # view: no bucket of padding alone
                    self._starts.append(s)
                    self.groups.append(key)
        ends = self._starts[1:] + [self.flat.numel()]
        self.buckets = [self.flat[s:e] for s, e in zip(self._starts, ends)]
        self.param_buckets: list[list[int]] = []  # the buckets each parameter's gradient lies in
        for at, end in zip(offsets, view_ends):
            k = bisect.bisect_right(self._starts, at) - 1
            self.param_buckets.append([])
            while k < len(self._starts) and self._starts[k] < end:
                self.param_buckets[-1].append(k)
                k += 1
        self._low: torch.Tensor | None = None  # the bf16 buffer of a bf16 all-reduce, made on first use
        self._comm: torch.cuda.Stream | None = None  # the stream of overlapped all-reduces (GradReadiness)

    @torch.no_grad()
    def reattach(self) -> bool:
        """Point every `.grad` at its view again, keeping its value (something replaced it) or
        zero (something cleared it). Returns whether all of them still were."""
        intact = True
        for p, view in zip(self.params, self.views):
            if p.grad is view:
                continue
            intact = False
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad)
            p.grad = view
        return intact

    def all_reduce(self, world: World, dtype: torch.dtype | None = None, skip: set[str] | frozenset = frozenset(),
                   ready: GradReadiness | None = None) -> None:
        """Sum the gradients across ranks, in place, bucket by bucket (all launched, then
        awaited), except the buckets of the groups in `skip` (every rank must pass the same).
        With `dtype=torch.bfloat16` the sums travel in bf16 (half the bytes; each rank's
        gradient and the sum rounded to bf16, as DDP's `bf16_compress_hook`).

        With `ready` (on a GPU), a bucket that the step's last backward completed (an event
        marks where) is summed on a stream of its own as soon as that event has passed, while the
        backward goes on with the others; the rest wait for everything queued before this call.
        In bf16 each bucket's sum is also copied back on that stream as soon as it has arrived.
        The buckets go in the same order on every rank whatever each one's backward did (from
        the last to the first: the order a backward completes them), as NCCL needs."""
        intact = self.reattach()
        sel = [k for k, g in enumerate(self.groups) if g not in skip][::-1]
        fired = set(ready.fired) if ready is not None and intact and self.flat.is_cuda else set()
        comm = None
        if fired:
            if self._comm is None:
                self._comm = torch.cuda.Stream(self.flat.device)
            comm, main, waited = self._comm, torch.cuda.current_stream(self.flat.device), False
        lowp = dtype is not None and dtype != self.flat.dtype
        if lowp and (self._low is None or self._low.dtype != dtype):
            self._low = torch.empty(self.flat.numel(), dtype=dtype, device=self.flat.device)
        launched = []
        for k in sel:
            b, s = self.buckets[k], self._starts[k]
            with torch.cuda.stream(comm) if comm is not None else nullcontext():
                if comm is not None:
                    if k in fired:
                        comm.wait_event(ready.events[k])
                    elif not waited:
                        comm.wait_stream(main)
                        waited = True
                low = self._low[s:s + b.numel()].copy_(b) if lowp else b
                work = dist.all_reduce(low, op=dist.ReduceOp.SUM, async_op=True)
                if comm is not None and lowp:  # the bf16 sum copied back on this stream, as it arrives
                    work.wait()
                    b.copy_(low)
                    continue
                launched.append((work, low, b))
        for work, low, b in launched:
            work.wait()  # the current stream waits for the sum (NCCL); gloo: the host does
            if low is not b:
                b.copy_(low)
        if comm is not None:
            main.wait_stream(comm)


class GradReadiness:
    """Which buckets of a `FlatGrads` the backward running now has completed, as DDP's reducer
    counts them: each parameter reports once when its gradient is written (a post-accumulate
    hook; the bf16 Linear layers write theirs in their own backward, before their
    AccumulateGrad node runs), and a bucket whose parameters have all reported is ready. Its
    event is then recorded on the backward's stream; inside a CUDA graph capture it becomes an
    event node that each replay records (`external=True`), so `FlatGrads.all_reduce` can start
    on that bucket while the rest of a replayed backward is still running.

    `begin()` before each tracked backward (the last one begun is what `fired` describes). A
    parameter's AccumulateGrad node runs once all its uses in the backward are done, so a layer
    called twice reports once. Where the counting cannot be trusted, `fired` is emptied and
    every bucket waits for the whole backward: a parameter reporting twice (a second backward
    not begun), or a gradient accumulated on another stream than the backward's (its
    AccumulateGrad node was made under another stream, e.g. a warm-up's, and kept alive)."""

    def __init__(self, flat: FlatGrads):
        self.flat = flat
        self._buckets_of = dict(zip(flat.params, flat.param_buckets))
        self._total = [0] * len(flat.buckets)  # parameters in each bucket
        for ks in flat.param_buckets:
            for k in ks:
                self._total[k] += 1
        self.cuda = flat.flat.is_cuda
        self.events = [torch.cuda.Event(external=True) for _ in flat.buckets] if self.cuda else []
        self.fired: list[int] = []  # buckets completed by the backward begun last, in that order
        self._pending = list(self._total)
        self._seen: set[torch.Tensor] = set()
        self._stream = None
        self.untracked: set[str] = set()  # why a backward was not tracked (each said once)
        for p in flat.params:
            p.register_post_accumulate_grad_hook(self._written)

    def begin(self, mark: bool = True) -> None:
        """A backward is about to run on the current stream (also one being captured). With
        `mark=False` it marks nothing: only a step's last backward needs its events, and each
        costs the others time (an event node adds ~15 us to every replay of a graph)."""
        self._seen, self.fired = set(), []
        self._pending = list(self._total) if mark else [-1] * len(self._total)
        self._stream = torch.cuda.current_stream(self.flat.flat.device) if self.cuda and mark else None

    def _written(self, p: torch.Tensor) -> None:
        if p in self._seen:  # reported twice: a backward not begun (one outside the steps: nothing to say)
            return self._untrack()
        if self._stream is not None and torch.cuda.current_stream(self._stream.device) != self._stream:
            # accumulated on another stream (an AccumulateGrad node made under it and kept alive):
            # the events on the backward's stream would not follow that work
            return self._untrack(f"a gradient was accumulated on another stream than the backward's ({p.shape})")
        self._seen.add(p)
        for k in self._buckets_of[p]:
            self._pending[k] -= 1
            if self._pending[k] == 0:
                self.ready(k)

    def _untrack(self, why: str = "") -> None:
        """Nothing of this backward is marked ready: every bucket waits for all of it."""
        self._pending = [-1] * len(self._total)
        self.fired = []
        if why and why not in self.untracked:
            self.untracked.add(why)
            log.warning("gradient all-reduce not overlapped for this backward: %s", why)

    def ready(self, k: int) -> None:
        """Bucket `k` has all its gradients (in stream order)."""
        if self._stream is not None:
            self.events[k].record(self._stream)
        self.fired.append(k)


def data_parallel_grads(model: torch.nn.Module, world: World, fsdp: bool, overlap: bool,
                        graphs: bool = False) -> tuple[FlatGrads | None, GradReadiness | None]:
    """DDP's gradient engine for `model` (None, None for one process, and under FSDP, whose
    shards are reduce-scattered in the backward): the flat buffer, bucketed within each top-level
    module (a head without targets is left out), and with `overlap` each bucket's all-reduce
    started once the last backward has written it (`graphs`: the backward is a CUDA graph's)."""
    if not world.active or fsdp:
        return None, None
    named = list(model.named_parameters())
    flat = FlatGrads([p for _, p in named], groups=[n.split(".", 1)[0] for n, _ in named])
    ready = GradReadiness(flat) if overlap else None
    if ready is not None:
        log.info("gradient all-reduce overlapped with the backward: each of %d buckets is summed once the "
                 "last micro-batch's backward has written it%s", len(flat.buckets),
                 " (event nodes in the CUDA graphs)" if graphs else "")
    return flat, ready


def loss_keys() -> tuple[str, ...]:
    """The step's loss components that are summed across ranks: the total, the task loss,
    R-Drop's term and each head's loss (redheart/heads.py)."""
    return ("loss", "task", "rdrop", *heads.names())


def sum_scalars(parts: dict[str, torch.Tensor], world: World, stop: bool = False) -> torch.Tensor:
    """Sum the step's loss components across ranks with one small all-reduce, and whether any
    rank was asked to stop. The result stays on the device (the caller reads it together with
    its own checks, see `unpack_scalars`): the sums of `loss_keys`, then how many ranks had each,
    then the stop count. A rank that had no sample this step contributes zeros."""
    ref = next(iter(parts.values()), None)
    device = ref.device if ref is not None else (torch.device("cuda", world.local_rank)
                                                  if dist.get_backend() == "nccl" else torch.device("cpu"))
    keys = loss_keys()
    n = len(keys)
    vec = torch.zeros(2 * n + 1, device=device)
    # in place on the device: `vec[j] = 1.0` would copy a host scalar, and wait for the device
    # to finish the whole step's work first (103 ms of a 259 ms step on two H200s)
    for i, k in enumerate(keys):
        if k in parts:
            vec[i].copy_(parts[k])
            vec[n + i].fill_(1.0)
    if stop:
        vec[2 * n].fill_(1.0)
    dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    return vec


def unpack_scalars(vec: torch.Tensor, counts: list[float]) -> tuple[dict[str, torch.Tensor], bool]:
    """(the summed components some rank had, any rank asked to stop) from `sum_scalars`'s
    vector and its counts part (`vec[len(loss_keys()):]`) already read to the host."""
    keys = loss_keys()
    n = len(keys)
    return {k: vec[i] for i, k in enumerate(keys) if counts[i] > 0}, counts[n] > 0


def gather_rows(local: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """Concatenate every rank's rows (in rank order) of each tensor; on one process, as is."""
    if not world.active:
        return local
    parts: list[dict[str, torch.Tensor] | None] = [None] * world.size
    dist.all_gather_object(parts, {k: v.cpu() for k, v in local.items()})
    return {k: torch.cat([p[k] for p in parts]) for k in local}


def all_objects(obj, world: World) -> list:
    if not world.active:
        return [obj]
    out: list = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj, world: World):
    """Rank 0's `obj` on every rank (a small picklable object)."""
    if not world.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when `flag` is true on any of them (a stop request seen by one rank)."""
    if not world.active:
        return flag
    device = torch.device("cuda", world.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shard_model(model: torch.nn.Module, layers: type[torch.nn.Module]) -> None:
    """FSDP2 over `model` (on its device): each `layers` module (a Transformer layer) is a unit
    of its own, the root holds the rest. Gradients are reduce-scattered as sums: FSDP's default
    mean over the ranks would undo the losses' normalisation by the whole step's counts (see above)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    # the model's device, not FSDP's default (the GPU whenever there is one: gloo runs on CPUs)
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    # a one-value head's output (regret) is a view (a squeeze); nothing changes the outputs in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for m in list(model.modules()):
        if isinstance(m, layers):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            if hasattr(m, "set_force_sum_reduction_for_comms"):  # torch >= 2.8
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
            else:  # torch 2.6, 2.7: a PREMUL_SUM by 1 (NCCL only)
                m.set_reduce_scatter_divide_factor(1.0)


def gathered(tree, world: World):
    """`tree` (a state dict: nested dicts and lists) with every DTensor, an FSDP shard, made
    whole on the CPU. Every rank must call it (each DTensor is all-gathered, in the same order
    on all ranks); rank 0 alone keeps the tensors, the others get None in their place."""
    if "torch.distributed.tensor" not in sys.modules:
        return tree  # no FSDP in this process: nothing is sharded
    from torch.distributed.tensor import DTensor

    def whole(t: DTensor) -> torch.Tensor | None:
        full = t.full_tensor()
        return full.cpu() if world.main else None

    return tree_map_only(DTensor, whole, tree)


def shard_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor `t` cut like `like` when that is an FSDP shard of the same shape
    (every rank holds `t`; a collective), else `t` as it is (AdamW's step count, no FSDP)."""
    if is_dtensor(like) and t.shape == like.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t.to(like.device), like.device_mesh, like.placements)
    return t


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A whole optimizer state as `torch.optim` writes it (keyed by parameter index) cut into
    this rank's shards of the optimizer's parameters."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return {**state, "state": {i: {k: shard_like(v, params[i]) if torch.is_tensor(v) else v for k, v in s.items()}
                               for i, s in state["state"].items()}}
