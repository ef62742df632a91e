"""One micro-batch: forward, losses (with R-Drop), backward; eagerly or as a CUDA graph.

At micro-batch 2 a 730M-parameter step is bound by kernel launches, not arithmetic: the GPU
waits for the host. `GraphedMicroSteps` captures forward + loss + backward once per input
shape (lengths padded up to a multiple of `bucket` tokens, so a few shapes cover all texts)
and replays the graph: one launch instead of thousands. Gradients accumulate in place into
the parameters' persistent `.grad` buffers, so the graphs and the optimizer (and gradient
accumulation across micro-batches) share them; they must never be set to None meanwhile.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from redheart import heads as head_table  # `heads` here: the towers a step runs
from redheart.config import TechniqueConfig
from redheart.model.packing import Packing, packed_rows, plan
from redheart.train.losses import rdrop_consistency, task_loss

log = logging.getLogger("redheart")


def placeholder_targets(b: int) -> dict[str, torch.Tensor]:
    """Targets for b samples with every item labelled, at a neutral value (a distribution's
    uniform shares, 0.5 for a [0, 1] value): the shapes a step's targets have, for a CUDA graph
    to capture and for the pre-flight check's step (validate.py)."""
    tgt = {}
    for h in head_table.HEADS:
        tgt[h.name] = torch.full(h.shape(b), 0.5 if h.kind == "values" else 1 / h.size)
        tgt[f"{h.name}_mask"] = torch.ones(h.mask_shape(b), dtype=torch.bool)
    tgt["weight"] = torch.ones(b)
    return tgt


def plan_packing(lengths: list[int], tech: TechniqueConfig, device: torch.device, width: int = 0,
                 rows_multiple: int = 0, segments: bool = False) -> Packing | None:
    """The packing of one micro-batch's forward pass (redheart/model/packing.py): R-Drop's
    doubled batch holds every text twice."""
    return plan(lengths * 2 if tech.rdrop_alpha > 0 else lengths, device, width, rows_multiple, segments)


GRAPH_BUCKET = 32  # CUDA graphs pad a micro-batch's width up to a multiple of this (fewer graphs)


def graph_width(length: int, max_tokens: int, bucket: int = GRAPH_BUCKET) -> int:
    """The width a CUDA graph runs a micro-batch whose longest text has `length` tokens at."""
    return min(max_tokens, -(-length // bucket) * bucket)


def micro_batch_tokens(lengths: list[int], rdrop: bool, width: int, packed: bool, rows_multiple: int = 0) -> int:
    """The tokens the token-wise layers process for one micro-batch of texts of these lengths
    padded to `width`: rows x width, with R-Drop's doubled batch, in packed rows (made up to a
    multiple of `rows_multiple`) or one row per text."""
    lens = lengths * (2 if rdrop else 1)
    return (packed_rows(lens, width, rows_multiple) if packed else len(lens)) * width


def towers_run(counts: dict[str, int]) -> list[str] | None:
    """The towers a training step runs (None: all): the heads with targets in the step.
    Another head's loss is left out (losses.py), so its tower's forward would be wasted and
    it runs no backward. CUDA graphs are captured per set of towers."""
    return [h for h, c in counts.items() if c > 0] or None


def forward_loss(model: nn.Module, states: torch.Tensor, keep: torch.Tensor, padded: bool,
                 tgt: dict[str, torch.Tensor], counts: dict[str, int] | torch.Tensor, tech: TechniqueConfig,
                 weights: dict[str, float], dtype: torch.dtype | None, cache: bool = True,
                 packing: Packing | None = None, heads: list[str] | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of one micro-batch and its components (detached, fp32). With a
    `packing` (`plan_packing`) the layers run on the texts packed into rows; with `heads`, only
    those towers (the heads with targets in the step: the others' losses would be left out)."""
    with torch.autocast(states.device.type, dtype=dtype or torch.float32, enabled=dtype is not None,
                        cache_enabled=cache):
        if tech.rdrop_alpha > 0:
            # R-Drop: one forward over the doubled batch = two passes with independent dropout.
            b = states.shape[0]
            out = model(torch.cat([states, states]), torch.cat([keep, keep]), padded, packing, heads)
            out_a = {k: v[:b] for k, v in out.items()}
            out_b = {k: v[b:] for k, v in out.items()}
            la, pa = task_loss(out_a, tgt, counts, weights, tech.label_smoothing, tech.smooth_surd, tech.value_loss)
            lb, pb = task_loss(out_b, tgt, counts, weights, tech.label_smoothing, tech.smooth_surd, tech.value_loss)
            cons = rdrop_consistency(out_a, out_b, tgt, counts)
            task = 0.5 * (la + lb)
            loss = task + tech.rdrop_alpha * cons
            parts = {h: 0.5 * (pa[h] + pb[h]) for h in pa}
            parts["rdrop"] = cons
        else:
            out = model(states, keep, padded, packing, heads)
            loss, parts = task_loss(out, tgt, counts, weights, tech.label_smoothing, tech.smooth_surd,
                                    tech.value_loss)
            task = loss
    parts = {**parts, "task": task, "loss": loss}
    return loss, {k: v.detach().float() for k, v in parts.items()}


def inverse_counts(counts: dict[str, int], device: torch.device) -> torch.Tensor:
    from redheart.data.features import to_device

    return to_device([1.0 / counts[h] if counts[h] > 0 else 0.0 for h in head_table.names()], device, torch.float32)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    states: torch.Tensor
    keep: torch.Tensor
    targets: dict[str, torch.Tensor]
    inv: torch.Tensor
    packing: Packing | None  # its index is the graph's input, rewritten before each replay
    parts: dict[str, torch.Tensor]
    heads: tuple[str, ...] | None  # the towers it runs (None: all)
    fired: tuple[int, ...] = ()  # the gradient buckets whose events its replay records (GradReadiness)


class GraphedMicroSteps:
    """Forward + loss + backward of a micro-batch as CUDA graphs, one per (batch, bucketed
    length, packed rows, towers run). With `rows_multiple` the texts are packed
    (redheart/model/packing.py) into a number of rows made up to a multiple of it, so that a
    few graphs cover every step."""

    def __init__(self, model: nn.Module, tech: TechniqueConfig, weights: dict[str, float],
                 dtype: torch.dtype | None, max_tokens: int, bucket: int = GRAPH_BUCKET, rows_multiple: int = 0,
                 ready=None):
        self.model, self.tech, self.weights, self.dtype = model, tech, weights, dtype
        self.ready = ready  # dist.GradReadiness: a replay marks the gradient buckets it completes
        self.max_tokens, self.bucket, self.rows_multiple = max_tokens, bucket, rows_multiple
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def width(self, length: int) -> int:
        return graph_width(length, self.max_tokens, self.bucket)

    def _run(self, g: _Graph) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return forward_loss(self.model, g.states, g.keep, True, g.targets, g.inv, self.tech, self.weights,
                            self.dtype, cache=False, packing=g.packing, heads=g.heads)

    def _capture(self, b: int, width: int, rows: int, heads: tuple[str, ...] | None, mark: bool, dim: int,
                 states_dtype: torch.dtype, device: torch.device) -> _Graph:
        for p in self.model.parameters():  # backward must accumulate in place, never allocate
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        saved = [p.grad.clone() for p in self.model.parameters() if p.requires_grad]
        # the random input and the warm-ups' dropout draw from the GPU's random stream: put back
        # after, so that training's dropout masks do not depend on when graphs are captured (a
        # resumed run captures them again; a step's last micro-batch has graphs of its own)
        rng = torch.cuda.get_rng_state(device)
        tg = placeholder_targets(b)
        # packed: any distinct positions do for the capture; each replay writes its own plan
        packing = None if not rows else Packing(torch.arange(rows * width, device=device),
                                                b * (2 if self.tech.rdrop_alpha > 0 else 1), rows, width)
        g = _Graph(torch.cuda.CUDAGraph(), torch.randn(b, width, dim, device=device).to(states_dtype),
                   torch.ones(b, width, dtype=torch.bool, device=device),
                   {k: v.to(device) for k, v in tg.items()}, torch.full((len(head_table.HEADS),), 1.0 / b, device=device),
                   packing, {}, heads)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (cuBLAS handles, autotuning, compiling)
            for _ in range(2):
                self._begin(mark)
                loss, _ = self._run(g)
                loss.backward()
        # the warm-up's autograd graph, gone: its AccumulateGrad nodes would otherwise serve the
        # capture and accumulate on the side stream, outside the order the graph's events mark
        del loss
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(g.graph, pool=self.pool):
            self._begin(mark)
            loss, g.parts = self._run(g)
            loss.backward()
        if self.ready is not None:  # the event nodes captured: each replay records them
            g.fired = tuple(self.ready.fired)
        with torch.no_grad():  # undo the warm-up's gradients (the capture itself computed nothing)
            torch._foreach_copy_([p.grad for p in self.model.parameters() if p.requires_grad], saved)
        torch.cuda.set_rng_state(rng, device)
        log.debug("captured a CUDA graph for micro-batch %d x %d tokens%s", b, width,
                  f" in {rows} packed rows" if rows else "")
        return g

    def __call__(self, states: torch.Tensor, keep: torch.Tensor, tgt: dict[str, torch.Tensor],
                 inv: torch.Tensor, lengths: list[int] | None = None, heads: list[str] | None = None,
                 last: bool = True) -> dict[str, torch.Tensor]:
        """One micro-batch; `lengths` (the texts' token counts) are needed when packing; `heads`:
        the towers to run (None: all), each set its own graphs. With `ready`, the graphs of a
        step's `last` micro-batch are others than the rest: only they record the gradient buckets'
        events."""
        b, n, dim = states.shape
        width = self.width(n)
        packing = None
        if self.rows_multiple:
            packing = plan_packing(lengths, self.tech, states.device, width, self.rows_multiple)
        key = (b, width, packing.rows if packing else 0, tuple(heads) if heads else None,
               last and self.ready is not None)
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key, dim, states.dtype, states.device)
        g = self.graphs[key]
        g.states.zero_()
        g.states[:, :n].copy_(states, non_blocking=True)
        g.keep.zero_()
        g.keep[:, :n].copy_(keep, non_blocking=True)
        for k, v in g.targets.items():
            v.copy_(tgt[k], non_blocking=True)
        g.inv.copy_(inv, non_blocking=True)
        if packing is not None:
            g.packing.index.copy_(packing.index, non_blocking=True)
        g.graph.replay()
        if self.ready is not None:
            self.ready.fired = list(g.fired)
        return {k: v.clone() for k, v in g.parts.items()}

    def _begin(self, mark: bool) -> None:
        if self.ready is not None:
            self.ready.begin(mark)

    def reset(self) -> None:
        """Drop every graph (and its memory), e.g. after an out-of-memory error."""
        self.graphs.clear()
