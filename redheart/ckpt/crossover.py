"""Parameter Crossover, the decisions: merging modules of state dicts and the greedy search.

Pure functions over dicts of tensors and a scoring callable, tested without a model. The
search starts from a base state (the best single epoch) and tries, module by module, the
weights of that module's sweet-spot epoch; a swap stays only if the combined validation
loss falls by more than `min_gain` (a greedy model soup over modules).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from redheart import heads
from redheart.model.modules import module_of

State = dict[str, torch.Tensor]


def check_same_keys(reference: State, other: State, label: str) -> None:
    missing = set(reference) - set(other)
    extra = set(other) - set(reference)
    if missing or extra:
        raise KeyError(f"state {label!r} does not match the base: missing {sorted(missing)[:5]}"
                       f"{'...' if len(missing) > 5 else ''}, extra {sorted(extra)[:5]}"
                       f"{'...' if len(extra) > 5 else ''}")
    for k, v in reference.items():
        if other[k].shape != v.shape:
            raise KeyError(f"state {label!r}: {k} has shape {tuple(other[k].shape)}, base {tuple(v.shape)}")


def merge_modules(base: State, sources: dict[str, State]) -> State:
    """A new state: each key from `sources[module]` when its module is given, else from `base`.

    Every key is taken from exactly one state; any missing or extra key is an error.
    """
    for module, st in sources.items():
        if module not in heads.modules():
            raise KeyError(f"merge source {module!r} is no module (expected one of {heads.modules()})")
        check_same_keys(base, st, module)
    return {k: (sources[module_of(k)][k] if module_of(k) in sources else v) for k, v in base.items()}


def average_states(states: list[State]) -> State:
    """Element-wise mean (in fp32) of states with the same keys."""
    if not states:
        raise ValueError("nothing to average")
    for i, s in enumerate(states[1:], start=1):
        check_same_keys(states[0], s, f"average member {i}")
    return {k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]}


def greedy_crossover(base: State, base_label: str, candidates: list[tuple[str, str, State]],
                     score: Callable[[State], float], min_gain: float = 0.0) -> dict[str, Any]:
    """Try each (module, label, state) candidate in order; keep a swap only when the score
    (lower is better) improves by more than `min_gain`. If none does, the base comes back
    unchanged (the same tensors)."""
    current, current_score = base, score(base)
    sources = {k: base_label for k in sorted({module_of(k) for k in base})}
    trials = [{"module": None, "source": base_label, "score": current_score, "kept": True}]
    for module, label, state in candidates:
        trial = merge_modules(current, {module: state})
        s = score(trial)
        kept = s < current_score - min_gain
        trials.append({"module": module, "source": label, "score": s, "kept": kept,
                       "gain": current_score - s})
        if kept:
            current, current_score = trial, s
            sources[module] = label
    return {"state": current, "score": current_score, "sources": sources, "trials": trials,
            "base_score": trials[0]["score"]}
