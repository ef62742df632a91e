"""The module map: which of `backbone` and the heads (`emotion`, `bentham`, `regret`, `surd`:
redheart/heads.py) owns a parameter.

Modules are the unit of Sweet Spot and Crossover. Ownership is by name prefix, so it can be
read off a state dict alone (no model needed) and every key has exactly one owner.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from redheart import heads
from redheart.config import Config


def module_of(name: str) -> str:
    """The module that owns a parameter or state-dict key; an unknown prefix is an error."""
    module = name.split(".", 1)[0]
    if module not in heads.modules():
        raise KeyError(f"parameter {name!r} belongs to no module (expected a prefix in {heads.modules()})")
    return module


def split_by_module(keys: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {m: [] for m in heads.modules()}
    for k in keys:
        out[module_of(k)].append(k)
    return out


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters per module and in total."""
    modules = heads.modules()
    counts = {m: 0 for m in modules}
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[module_of(name)] += p.numel()
    counts["total"] = sum(counts[m] for m in modules)
    return counts


def preset_parameter_counts(cfg: Config) -> dict[str, int]:
    """Parameter counts of a config's network, built on the meta device (nothing allocated)."""
    from redheart.model.network import RedHeartNet

    with torch.device("meta"):
        net = RedHeartNet(cfg.model)
    return count_parameters(net)
