"""Parameter Crossover, the pure parts: merging modules of state dicts and the greedy search."""
from __future__ import annotations

import pytest
import torch

from redheart.ckpt.crossover import average_states, check_same_keys, greedy_crossover, merge_modules
from redheart.config import MODULES

SHAPES = {
    "backbone.embed.weight": (5, 3),
    "backbone.layers.0.attn.weight": (3, 3),
    "backbone.norm.bias": (3,),
    "emotion.proj.weight": (7, 3),
    "emotion.proj.bias": (7,),
    "bentham.proj.weight": (10, 3),
    "regret.proj.weight": (1, 3),
    "surd.proj.weight": (4, 3),
    "surd.proj.bias": (4,),
}


def state(value: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """A state whose tensors are constant: `value`, or value[module] per module."""
    def v(k: str) -> float:
        return value[k.split(".")[0]] if isinstance(value, dict) else value
    return {k: torch.full(s, float(v(k))) for k, s in SHAPES.items()}


def module_values(st: dict[str, torch.Tensor]) -> dict[str, set[float]]:
    out: dict[str, set[float]] = {}
    for k, t in st.items():
        out.setdefault(k.split(".")[0], set()).update(t.unique().tolist())
    return out


# ---------------------------------------------------------------- merge_modules


def test_merge_takes_each_key_from_exactly_one_source():
    base = state(0.0)
    srcs = {"emotion": state(1.0), "bentham": state(2.0), "surd": state(4.0)}
    merged = merge_modules(base, srcs)
    assert list(merged) == list(base)
    assert module_values(merged) == {"backbone": {0.0}, "emotion": {1.0}, "bentham": {2.0},
                                     "regret": {0.0}, "surd": {4.0}}
    for k, t in merged.items():
        m = k.split(".")[0]
        assert t is (srcs[m][k] if m in srcs else base[k])  # taken, not copied or mixed


def test_merge_every_module_from_a_different_source():
    base = state(-1.0)
    srcs = {m: state(float(i)) for i, m in enumerate(MODULES)}
    merged = merge_modules(base, srcs)
    assert module_values(merged) == {m: {float(i)} for i, m in enumerate(MODULES)}
    assert not any((t == -1.0).any() for t in merged.values())


def test_merge_with_no_sources_is_the_base_and_inputs_are_untouched():
    base = state(0.0)
    merged = merge_modules(base, {})
    assert merged is not base and list(merged) == list(base)
    assert all(merged[k] is base[k] for k in base)
    src = state(3.0)
    merge_modules(base, {"regret": src})
    assert module_values(base) == {m: {0.0} for m in MODULES}
    assert module_values(src) == {m: {3.0} for m in MODULES}


def test_merge_missing_key_fails():
    src = state(1.0)
    del src["emotion.proj.bias"]
    with pytest.raises(KeyError, match="missing"):
        merge_modules(state(0.0), {"emotion": src})
    # a key missing from another module's part fails too: the sources must match whole
    src = state(1.0)
    del src["backbone.norm.bias"]
    with pytest.raises(KeyError, match="backbone.norm.bias"):
        merge_modules(state(0.0), {"emotion": src})


def test_merge_extra_key_fails():
    src = state(1.0)
    src["emotion.extra.weight"] = torch.zeros(2)
    with pytest.raises(KeyError, match="emotion.extra.weight"):
        merge_modules(state(0.0), {"emotion": src})


def test_merge_shape_mismatch_fails():
    src = state(1.0)
    src["surd.proj.weight"] = torch.zeros(5, 3)
    with pytest.raises(KeyError, match="surd.proj.weight"):
        merge_modules(state(0.0), {"surd": src})


def test_merge_key_without_module_prefix_fails():
    base = state(0.0)
    base["stray.weight"] = torch.zeros(2)
    src = state(1.0)
    src["stray.weight"] = torch.zeros(2)
    with pytest.raises(KeyError, match="stray.weight"):
        merge_modules(base, {"emotion": src})
    with pytest.raises(KeyError, match="weight"):
        merge_modules({"weight": torch.zeros(1)}, {})


def test_merge_unknown_source_module_fails():
    with pytest.raises(KeyError, match="emotions"):
        merge_modules(state(0.0), {"emotions": state(1.0)})


def test_check_same_keys_accepts_a_match():
    check_same_keys(state(0.0), state(5.0), "x")  # no error


# ---------------------------------------------------------------- average_states


def test_average_states_elementwise_mean_in_fp32():
    a, b, c = state(1.0), state(2.0), state(6.0)
    b["emotion.proj.bias"] = torch.arange(7, dtype=torch.float32)
    avg = average_states([a, b, c])
    assert set(avg) == set(SHAPES)
    assert torch.equal(avg["backbone.embed.weight"], torch.full((5, 3), 3.0))
    assert torch.allclose(avg["emotion.proj.bias"], (1.0 + torch.arange(7.0) + 6.0) / 3)
    assert all(t.dtype == torch.float32 for t in avg.values())
    half = {k: t.to(torch.bfloat16) for k, t in state(1.5).items()}
    avg2 = average_states([half, state(2.5)])
    assert avg2["surd.proj.bias"].dtype == torch.float32
    assert torch.equal(avg2["surd.proj.bias"], torch.full((4,), 2.0))
    assert torch.equal(average_states([state(7.0)])["regret.proj.weight"], torch.full((1, 3), 7.0))


def test_average_states_errors():
    with pytest.raises(ValueError):
        average_states([])
    b = state(1.0)
    del b["regret.proj.weight"]
    with pytest.raises(KeyError):
        average_states([state(0.0), b])
    c = state(1.0)
    c["regret.proj.weight"] = torch.zeros(3, 1)
    with pytest.raises(KeyError):
        average_states([state(0.0), c])


# ---------------------------------------------------------------- greedy_crossover


TARGET = {"backbone": 0.0, "emotion": 1.0, "bentham": 0.0, "regret": 0.0, "surd": 1.0}


def make_score(target: dict[str, float], calls: list | None = None):
    """Lower is better: sum over modules of (module value - target)^2 (states are constant per module)."""
    def score(st: dict[str, torch.Tensor]) -> float:
        if calls is not None:
            calls.append(st)
        vals = {}
        for k, t in st.items():
            vals[k.split(".")[0]] = float(t.float().mean())
        return sum((vals[m] - target[m]) ** 2 for m in vals)
    return score


def test_greedy_keeps_only_improving_swaps():
    base = state(0.0)  # base score: (0-1)^2 + (0-1)^2 = 2
    cands = [("emotion", "ep4", state(1.0)),  # emotion -> 1: score 1 (kept)
             ("bentham", "ep8", state(3.0)),  # bentham -> 3: score 1 + 9 (rejected)
             ("surd", "ep12", state(0.5)),  # surd -> 0.5: score 0.25 (kept)
             ("regret", "ep10", state(0.0))]  # regret unchanged: no gain (rejected)
    calls: list = []
    res = greedy_crossover(base, "ep6", cands, make_score(TARGET, calls))
    assert len(calls) == 1 + len(cands)  # the base once, then each trial once
    assert res["base_score"] == pytest.approx(2.0)
    assert res["score"] == pytest.approx(0.25)
    assert res["sources"] == {"backbone": "ep6", "emotion": "ep4", "bentham": "ep6",
                              "regret": "ep6", "surd": "ep12"}
    assert [t["kept"] for t in res["trials"]] == [True, True, False, True, False]
    assert [t["score"] for t in res["trials"]] == pytest.approx([2.0, 1.0, 10.0, 0.25, 0.25])
    assert res["trials"][2]["gain"] == pytest.approx(-9.0)
    assert module_values(res["state"]) == {"backbone": {0.0}, "emotion": {1.0}, "bentham": {0.0},
                                           "regret": {0.0}, "surd": {0.5}}
    # the trials are tried against the current (already improved) state, not the base
    assert module_values(calls[3])["emotion"] == {1.0}
    assert res["score"] == pytest.approx(make_score(TARGET)(res["state"]))


def test_greedy_second_candidate_for_a_module_must_beat_the_first():
    base = state(0.0)
    cands = [("emotion", "a", state(0.9)), ("emotion", "b", state(0.5)), ("emotion", "c", state(1.0))]
    res = greedy_crossover(base, "base", cands, make_score(TARGET))
    assert [t["kept"] for t in res["trials"][1:]] == [True, False, True]
    assert res["sources"]["emotion"] == "c"
    assert res["score"] == pytest.approx(1.0)


def test_greedy_without_improvement_returns_the_base_unchanged():
    base = state({"backbone": 0.0, "emotion": 1.0, "bentham": 0.0, "regret": 0.0, "surd": 1.0})
    snapshot = {k: t.clone() for k, t in base.items()}
    cands = [(m, f"ep{i}", state(5.0)) for i, m in enumerate(MODULES)]
    score = make_score(TARGET)
    res = greedy_crossover(base, "best", cands, score)
    assert res["state"] is base
    assert all(res["state"][k] is base[k] for k in base)  # the very same tensors
    assert all(torch.equal(base[k], snapshot[k]) for k in base)
    assert res["score"] == res["base_score"] == score(base) == 0.0
    assert set(res["sources"].values()) == {"best"}
    assert not any(t["kept"] for t in res["trials"][1:])


def test_greedy_with_no_candidates():
    base = state(0.0)
    res = greedy_crossover(base, "b", [], make_score(TARGET))
    assert res["state"] is base
    assert res["score"] == pytest.approx(2.0)
    assert len(res["trials"]) == 1


def test_greedy_min_gain():
    base = state(0.0)
    cands = [("emotion", "ep4", state(0.5))]  # gain: 2 - (0.25 + 1) = 0.75
    score = make_score(TARGET)
    strict = greedy_crossover(base, "b", cands, score, min_gain=1.0)
    assert strict["state"] is base and strict["sources"]["emotion"] == "b"
    assert strict["trials"][1]["gain"] == pytest.approx(0.75)
    assert strict["trials"][1]["kept"] is False
    loose = greedy_crossover(base, "b", cands, score, min_gain=0.5)
    assert loose["sources"]["emotion"] == "ep4"
    assert loose["score"] == pytest.approx(1.25)
    # a gain exactly equal to min_gain is not "more than" it
    assert greedy_crossover(base, "b", cands, score, min_gain=0.75)["sources"]["emotion"] == "b"


def test_greedy_candidate_with_wrong_keys_fails_loudly():
    bad = state(1.0)
    del bad["emotion.proj.weight"]
    with pytest.raises(KeyError):
        greedy_crossover(state(0.0), "b", [("emotion", "ep4", bad)], make_score(TARGET))
