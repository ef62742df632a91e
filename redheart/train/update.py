"""The update of a training step, after its forward and backward: the gradients summed across
ranks, clipped, checked for finite values, AdamW, the LR schedule and the EMA. A non-finite
step is skipped and counted. With deferred checks (`train.finite_check`) the check stays on
the device and the host reads it while the next step's work is queued (`Update.settle`)."""
from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from redheart.config import Config
from redheart.dist import (FlatGrads, GradReadiness, World, any_rank, is_dtensor, loss_keys, sum_scalars,
                           unpack_scalars)
from redheart.model.network import ENCODER_TOP
from redheart.train.ema import EMA
from redheart.train.faults import Faults
from redheart.train.plan import RunPlan
from redheart.train.schedule import warmup_cosine
from redheart.train.stopping import StopFlag
from redheart.train.swap import SwapAdamW

log = logging.getLogger("redheart")


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


class Update:
    """The optimizer, the LR schedule and the EMA of a run, and how a step's gradients reach
    them. `grads_in_place()`: whether something holds the gradient buffers (CUDA graphs, the
    bf16 copies' fused accumulation), so that they are zeroed in place instead of dropped."""

    def __init__(self, model: torch.nn.Module, cfg: Config, plan: RunPlan, device: torch.device, world: World,
                 stop: StopFlag, faults: Faults, total_steps: int, flat_grads: FlatGrads | None,
                 ready: GradReadiness | None, grads_in_place: Callable[[], bool]):
        self.model, self.cfg, self.device, self.world, self.stop, self.faults = model, cfg, device, world, stop, faults
        self.fsdp, self.swap, self.total_steps = plan.fsdp, plan.swap, total_steps
        self.flat_grads, self.ready, self.grads_in_place = flat_grads, ready, grads_in_place
        self.lr = cfg.train.lr
        self.optimizer = build_optimizer(model, cfg, self.lr, device, self.swap)
        self.scheduler = self._schedule()
        self.ema = None
        if plan.ema_device is not None:
            self.ema = EMA(model, cfg.tech.ema_decay, cfg.tech.ema_warmup, torch.device(plan.ema_device))
        self.stats = StepStats()  # the epoch's, so far
        self.bad_steps_in_row = 0
        self.bad_steps_total = 0
        self.unchecked: UncheckedStep | None = None  # the last step, while its check is on the device
        self.stop_agreed = False  # any rank asked to stop, as of the last step read (`_read_summed`)
        self._ranks_defer = True  # several ranks defer their checks only all together (see defers_checks)
        if world.active:
            self._ranks_defer = not any_rank(not self.defers_checks(), world)
        if self.defers_checks():
            log.info("finite checks deferred: a bad step is skipped on the device, and the host reads "
                     "each step's check while the next step's work is queued")

    def _schedule(self) -> torch.optim.lr_scheduler.LRScheduler:
        return warmup_cosine(self.optimizer, self.total_steps, self.cfg.train.warmup_ratio, self.cfg.train.min_lr_ratio)

    def set_lr(self, lr: float) -> None:
        """Use a new peak LR (the sweep's choice) before training starts."""
        self.lr = lr
        set_peak_lr(self.optimizer, lr)
        for g in self.optimizer.param_groups:
            g.pop("initial_lr", None)
        self.scheduler = self._schedule()

    def to_swap(self) -> None:
        """Move the optimizer (and EMA) to CPU memory mid-run, keeping their exact state."""
        state, sched = self.optimizer.state_dict(), self.scheduler.state_dict()
        self.optimizer = None
        gc.collect()
        self.optimizer = build_optimizer(self.model, self.cfg, self.lr, self.device, swap=True)
        self.optimizer.load_state_dict(state)
        self.scheduler = self._schedule()
        self.scheduler.load_state_dict(sched)
        if self.ema is not None and self.ema.device.type != "cpu":
            self.ema.move_to(torch.device("cpu"))
        self.swap = True

    def zero_grad(self) -> None:
        """Clear the gradients; in place while CUDA graphs or the bf16 copies' fused accumulation
        hold their buffers, else set to None."""
        if self.grads_in_place() or self.flat_grads is not None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def apply_update(self, optimizer: torch.optim.Optimizer, parts: dict[str, torch.Tensor],
                     idle: set[str] | frozenset[str] = frozenset(), defer: bool = False) -> bool | torch.Tensor:
        """Clip and step `optimizer` unless the loss or gradient is not finite; clear gradients.
        Returns whether the step was applied; with `defer` (a fused AdamW) the check stays on the
        device, where AdamW skips its own update, and comes back as a tensor: the flag, or with
        several ranks the vector [flag, `sum_scalars`'s sums, counts and stop count].

        A head without targets in this step takes no part in it (no decay, no momentum), as in
        the eager path where its gradients are None; CUDA graphs keep zeros there, so hide them:
        `idle`, the heads without targets in the step (the same on every rank).
        """
        summed = None
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
        loss = parts["loss"] if summed is None else summed[0]  # loss_keys()[0] is the total loss
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
        totals, self.stop_agreed = unpack_scalars(check[1:], host[1 + len(loss_keys()):])
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
                    and not self.faults.synchronous_checks(self.world.rank))
        return possible and (mode == "deferred" or (mode == "auto" and self.device.type == "cuda"))

    def step(self, parts: dict[str, torch.Tensor], step: int, idle: set[str] | frozenset[str] = frozenset()
             ) -> bool | None:
        """The update of a training step: AdamW, schedule, EMA; a non-finite step is skipped and
        counted. Returns whether it was applied, or None while its check is on the device: then
        `settle` (called by the next step, before its update, and before anything that reads the
        schedule, the EMA or the counts) finishes it. The order of the GPU's work is the same
        either way (the EMA reads the weights before the next update), so are the results.
        `step`: the global step, as the log counts it; `idle`: see `apply_update`."""
        self.settle()
        self.stats.lrs.append(self.scheduler.get_last_lr()[0])
        finite = self.apply_update(self.optimizer, parts, idle, defer=self.defers_checks())
        if isinstance(finite, torch.Tensor):
            ok, event = finite, None
            if ok.device.type == "cuda":  # copied to the host behind the step's work, not waited for
                ok = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True).copy_(finite, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            self.unchecked = UncheckedStep(step, parts, ok, event, finite if self.world.active else None)
            return None
        self._step_done(step, parts, finite)
        return finite

    def settle(self) -> bool | None:
        """Finish the step whose finite check was left on the device, if any: wait for that
        step's end (not for the work queued since), then schedule, EMA and counts. Returns
        whether that step was applied (None: there was none)."""
        u, self.unchecked = self.unchecked, None
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
            self.stats.add(parts)  # a skipped step's non-finite loss would make the epoch's mean NaN
            self.stats.steps += 1
        else:
            self.bad_steps_total += 1
            self.bad_steps_in_row += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row, %d in all)",
                        step, self.bad_steps_in_row, self.bad_steps_total)
