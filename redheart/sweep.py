"""LR sweep: short runs at log-spaced learning rates from the same initial weights on the same
batches, scored on validation loss; the winner becomes the training LR.

`select_lr` is the decision, a pure function of the curves: score = mean of the last
`score_last` validation losses (stable against one noisy evaluation); a run is diverged when
any evaluation is not finite or its last loss is above the loss at the start, and a diverged
run never wins.
"""
from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np
import torch

from redheart.ckpt.io import atomic_write_text
from redheart.ckpt.state import capture_rng, restore_rng, timestamp
from redheart.data.dataset import epoch_plan
from redheart.train.evaluation import evaluate
from redheart.train.trainer import Trainer
from redheart.train.update import build_optimizer, set_peak_lr

log = logging.getLogger("redheart")


def log_spaced(lo: float, hi: float, n: int) -> list[float]:
    return [float(x) for x in np.logspace(math.log10(lo), math.log10(hi), n)]


def score_curve(curve: list[float], start_loss: float, last: int) -> dict[str, Any]:
    finite = all(math.isfinite(v) for v in curve)
    diverged = (not finite) or (not curve) or curve[-1] > start_loss
    score = float(np.mean(curve[-last:])) if curve and finite else float("inf")
    why = ("non-finite loss" if not finite else
           f"last loss {curve[-1]:.4f} above the start {start_loss:.4f}" if curve and curve[-1] > start_loss else "")
    return {"score": score, "diverged": diverged, "why": why}


def select_lr(points: list[dict[str, Any]], start_loss: float, last: int) -> dict[str, Any]:
    """points: [{"lr", "curve": [val losses]}] -> {"lr" or None, "scores", "reason"}."""
    scored = [{"lr": p["lr"], **score_curve(p["curve"], start_loss, last)} for p in points]
    ok = [s for s in scored if not s["diverged"]]
    if not ok:
        return {"lr": None, "scored": scored,
                "reason": "every learning rate diverged; the configured LR is kept"}
    best = min(ok, key=lambda s: (s["score"], s["lr"]))
    others = sorted(s["score"] for s in ok if s is not best)
    margin = f", {others[0] - best['score']:.4f} below the next" if others else ""
    n_div = len(scored) - len(ok)
    return {"lr": best["lr"], "scored": scored,
            "reason": f"lowest mean of the last {last} validation losses ({best['score']:.4f}{margin}); "
                      f"{n_div} of {len(scored)} diverged"}


def refine_grid(lrs: list[float], winner: float) -> list[float]:
    """Two new rates around the winner (which was already run): the geometric midpoints to its
    neighbours; at an end of the grid, half a grid step beyond it."""
    s = sorted(lrs)
    i = s.index(winner)
    lo = math.sqrt(s[i - 1] * winner) if i > 0 else winner / math.sqrt(s[1] / s[0])
    hi = math.sqrt(s[i + 1] * winner) if i + 1 < len(s) else winner * math.sqrt(s[1] / s[0])
    return [lo, hi]


def _sweep_steps(trainer: Trainer, n: int) -> list[list[int]]:
    cfg = trainer.cfg
    steps: list[list[int]] = []
    epoch = 0
    while len(steps) < n:
        epoch -= 1  # epochs of their own, not the training epochs' orders
        steps += epoch_plan(trainer.train_data.lengths, cfg.effective_batch, cfg.train.seed, epoch,
                            cfg.data.length_group_steps)
    return steps[:n]


def _fresh_optimizer(trainer: Trainer, lr: float) -> torch.optim.Optimizer:
    """A new AdamW at `lr` over the model's current weights. Under the swap manager it is the
    trainer's own, emptied: a plain AdamW would put the moments on the GPU the manager exists
    to spare, and a second manager would double the pinned host memory."""
    if not trainer.swap:
        return build_optimizer(trainer.model, trainer.cfg, lr, trainer.device)
    opt = trainer.optimizer
    opt.state.clear()
    opt.sync_from_model()
    set_peak_lr(opt, lr)
    return opt


def _one_run(trainer: Trainer, lr: float, steps: list[list[int]], init: dict[str, torch.Tensor],
             rng: dict[str, Any]) -> dict[str, Any]:
    cfg = trainer.cfg
    trainer.model.load_state_dict(init)
    restore_rng(rng)
    opt = _fresh_optimizer(trainer, lr)
    curve, at, train_losses = [], [], []
    for s, step in enumerate(steps, start=1):
        trainer.model.train()
        parts = trainer.accumulate(step)
        trainer.apply_update(opt, parts)
        train_losses.append(parts["loss"])
        if s % cfg.sweep.eval_every == 0 or s == len(steps):
            loss = evaluate(trainer.model, trainer.features["val"], cfg, trainer.dtype, trainer.world)["loss"]
            curve.append(loss)
            at.append(s)
            if not math.isfinite(loss):
                break
    return {"lr": lr, "curve": curve, "steps": at, "train_loss": [float(v) for v in train_losses]}


def run_sweep(trainer: Trainer) -> dict[str, Any]:
    """Run the sweep on the trainer's model; leaves the model and RNG as they were."""
    cfg = trainer.cfg
    sw = cfg.sweep
    init = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    rng = capture_rng()
    steps = _sweep_steps(trainer, sw.steps)
    start_loss = evaluate(trainer.model, trainer.features["val"], cfg, trainer.dtype, trainer.world)["loss"]
    lrs = log_spaced(sw.lr_min, sw.lr_max, sw.points)
    log.info("LR sweep: %d rates from %.1e to %.1e, %d steps each (start val loss %.4f)",
             len(lrs), lrs[0], lrs[-1], len(steps), start_loss)
    points = []
    for lr in lrs:
        p = _one_run(trainer, lr, steps, init, rng)
        points.append(p)
        log.info("  lr %.2e: val loss %s", lr, " ".join(f"{v:.4f}" for v in p["curve"]))
    choice = select_lr(points, start_loss, sw.score_last)
    if sw.refine and choice["lr"] is not None:
        for lr in refine_grid(lrs, choice["lr"]):
            p = _one_run(trainer, lr, steps, init, rng)
            p["refine"] = True
            points.append(p)
            log.info("  refine lr %.2e: val loss %s", lr, " ".join(f"{v:.4f}" for v in p["curve"]))
        choice = select_lr(points, start_loss, sw.score_last)
    trainer.model.load_state_dict(init)
    if trainer.swap:
        _fresh_optimizer(trainer, cfg.train.lr)  # as built: no moments, master weights = init
    restore_rng(rng)
    chosen = choice["lr"] if choice["lr"] is not None else cfg.train.lr
    log.info("LR sweep chose %.2e: %s", chosen, choice["reason"])
    return {"lr": chosen, "selected": choice["lr"], "reason": choice["reason"], "start_loss": start_loss,
            "points": [{**p, **next(s for s in choice["scored"] if s["lr"] == p["lr"])} for p in points],
            "config": {"lr_min": sw.lr_min, "lr_max": sw.lr_max, "points": sw.points, "steps": sw.steps,
                       "eval_every": sw.eval_every, "score_last": sw.score_last, "refine": sw.refine,
                       "effective_batch": cfg.effective_batch}}


def write_sweep(result: dict[str, Any], folder, stamp: str | None = None) -> tuple[str, str]:
    from redheart.plots import plot_lr_sweep

    stamp = stamp or timestamp()
    folder.mkdir(parents=True, exist_ok=True)
    jpath = folder / f"lr_sweep_{stamp}.json"
    ppath = folder / f"lr_sweep_plot_{stamp}.png"
    atomic_write_text(json.dumps(result, indent=2, allow_nan=True) + "\n", jpath)
    plot_lr_sweep(result, ppath)
    return str(jpath), str(ppath)
