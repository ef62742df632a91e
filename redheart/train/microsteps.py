"""Forward and backward over one optimizer step's micro-batches: eager or as CUDA graph replays,
the texts packed into shared rows or padded, from bf16 weight copies or under plain autocast.
A stop request is honoured between micro-batches, and on the CPU within them (`stop_per_layer`),
while the loop allows it (`abandonable`)."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.profiler import record_function

from redheart.config import Config
from redheart.data.dataset import TaskData
from redheart.data.features import FeatureSource, to_device
from redheart.dist import GradReadiness
from redheart.model.lowp import LowPrecisionCopies
from redheart.train.faults import Faults
from redheart.train.plan import PACKED_ROWS_MULTIPLE, RunPlan
from redheart.train.profile import MICRO_BATCH
from redheart.train.step import GraphedMicroSteps, forward_loss, inverse_counts, micro_batch_tokens, plan_packing
from redheart.train.stopping import StepAbandoned, StopFlag, stop_per_layer

log = logging.getLogger("redheart")


class MicroSteps:
    """The forward and backward passes of a run's training steps (the module's docstring); which
    samples each micro-batch holds is the trainer's (`Trainer.accumulate`)."""

    def __init__(self, model: torch.nn.Module, cfg: Config, plan: RunPlan, device: torch.device,
                 source: FeatureSource, data: TaskData, ready: GradReadiness | None, stop: StopFlag, faults: Faults):
        self.model, self.cfg, self.device, self.dtype = model, cfg, device, plan.dtype
        self.source, self.lengths, self.ready, self.stop, self.faults = source, data.lengths, ready, stop, faults
        self.packing, self.varlen = plan.packing, plan.varlen_attention
        self.lowp = None
        if plan.bf16_weights:
            self.lowp = LowPrecisionCopies(model, torch.bfloat16)
            log.info("bf16 weight copies on (%.2f GiB, cast once per optimizer step); weight gradients "
                     "summed in fp32 %s", self.lowp.nbytes / 2**30,
                     "by the matrix product (fused)" if self.lowp.fused else "after a bf16 product")
        self.graphs = None
        if plan.cuda_graphs:
            self.graphs = GraphedMicroSteps(model, cfg.tech, cfg.train.head_weights, self.dtype, cfg.model.max_tokens,
                                            rows_multiple=PACKED_ROWS_MULTIPLE * self.packing, ready=ready)
        if self.packing:
            rows = f" (CUDA graphs: rows made up to a multiple of {PACKED_ROWS_MULTIPLE})" if self.graphs else ""
            attention = ("within each text's segment of the rows (FlashAttention varlen)" if self.varlen
                         else "in the padded layout")
            log.info("sequence packing on: the texts of a micro-batch share rows in the token-wise layers%s; "
                     "attention %s", rows, attention)
        self.annotate = False  # each micro-batch annotated for the profiler (`annotating`)
        # whether a stop request ends a step between its micro-batches (`StepAbandoned`): in
        # training proper, by one process (several ranks stop together, after a step)
        self.abandonable = False
        self.in_step = False  # inside a training step's forward and backward (`run`)
        if device.type == "cpu" and not cfg.train.compile:
            stop_per_layer(model, lambda: self.in_step and self.abandonable and self.stop.requested)

    def holds_grads(self) -> bool:
        """Whether CUDA graphs or the bf16 copies' fused accumulation hold the gradient buffers."""
        return self.graphs is not None or self.lowp is not None

    def release(self) -> None:
        """Memory first (the swap manager turned on mid-run): no graphs, back to plain autocast."""
        if self.graphs is not None:
            self.graphs.reset()
            self.graphs = None
        if self.lowp is not None:
            self.lowp.release()
            self.lowp = None

    @contextmanager
    def annotating(self) -> Iterator[None]:
        """Inside, each micro-batch is annotated for the profiler with its texts and tokens
        (`redheart.train.profile.micro_batch_times`)."""
        self.annotate = True
        try:
            yield
        finally:
            self.annotate = False

    def cost(self, mb: list[int]) -> int:
        """The tokens the token-wise layers process for this micro-batch as it will run: rows x
        width, with R-Drop's doubled batch, packed rows (made up for the graphs) and the graphs'
        bucketed width. A micro-batch also costs fixed work (launches, towers), but every rank is
        dealt as many micro-batches (within one), so that part is even anyway."""
        lens = [int(self.lengths[i]) for i in mb]
        width = self.graphs.width(max(lens)) if self.graphs is not None else max(lens)
        return micro_batch_tokens(lens, self.cfg.tech.rdrop_alpha > 0, width, self.packing,
                                  self.graphs.rows_multiple if self.graphs is not None else 0)

    def run(self, mbs: list[list[int]], own: int, counts: dict[str, int], heads: list[str] | None,
            step: int, attempt: int) -> dict[str, torch.Tensor]:
        """Forward and backward over the micro-batches `mbs` of the step after global step `step`
        (`attempt`: how many out-of-memory errors it met before), running the towers `heads`.
        Those from index `own` on are FSDP's fillers: their loss counts zero times, but their
        backward reaches the same parameters as a real one's, so every rank runs the same
        collectives."""
        self.in_step = True
        try:
            return self._run(mbs, own, counts, heads, step, attempt)
        finally:
            self.in_step = False

    def _run(self, mbs: list[list[int]], own: int, counts: dict[str, int], heads: list[str] | None,
             step: int, attempt: int) -> dict[str, torch.Tensor]:
        tech, weights = self.cfg.tech, self.cfg.train.head_weights
        source, lengths = self.source, self.lengths
        inv = inverse_counts(counts, self.device) if self.graphs is not None else None
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
                self.faults.stop_before_micro_batch(step, n, self.stop)
                if self.stop.requested:
                    raise StepAbandoned()
            self.faults.out_of_memory(step, attempt)
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
            with (record_function(f"{MICRO_BATCH}{len(mb)} texts, {self.cost(mb)} tokens")
                  if self.annotate else nullcontext()):  # a profiled step: what each micro-batch costs
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
                    self.faults.stop_in_backward(step, n, loss, self.stop)
                    loss.backward()
            for k, v in parts.items():
                parts_sum[k] = parts_sum[k] + v if k in parts_sum else v
        return parts_sum
