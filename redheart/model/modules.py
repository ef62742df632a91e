"""The module map: which of `backbone`, `emotion`, `bentham`, `regret`, `surd` owns a parameter.

Modules are the unit of Sweet Spot and Crossover. Ownership is by name prefix, so it can be
read off a state dict alone (no model needed) and every key has exactly one owner.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from redheart.config import MODULES, Config


def module_of(name: str) -> str:
    """The module that owns a parameter or state-dict key; an unknown prefix is an error."""
    head = name.split(".", 1)[0]
    if head not in MODULES:
        raise KeyError(f"parameter {name!r} belongs to no module (expected a prefix in {MODULES})")
    return head


def split_by_module(keys: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {m: [] for m in MODULES}
    for k in keys:
        out[module_of(k)].append(k)
    return out


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters per module and in total."""
    counts = {m: 0 for m in MODULES}
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[module_of(name)] += p.numel()
    counts["total"] = sum(counts[m] for m in MODULES)
    return counts


def preset_parameter_counts(cfg: Config) -> dict[str, int]:
    """Parameter counts of a config's network, built on the meta device (nothing allocated)."""
    from redheart.model.network import RedHeartNet

    with torch.device("meta"):
        net = RedHeartNet(cfg.model)
    return count_parameters(net)
