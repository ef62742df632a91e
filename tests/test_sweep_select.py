"""LR sweep, the decisions: log_spaced, score_curve, select_lr, refine_grid (pure)."""
from __future__ import annotations

import math

import pytest

from redheart.sweep import log_spaced, refine_grid, score_curve, select_lr

NAN, INF = float("nan"), float("inf")


def test_log_spaced_values():
    lrs = log_spaced(1e-5, 1e-2, 5)
    expected = [1e-5, 10 ** -4.25, 10 ** -3.5, 10 ** -2.75, 1e-2]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[1] == pytest.approx(5.6234e-5, rel=1e-4)
    assert lrs[2] == pytest.approx(3.1623e-4, rel=1e-4)
    assert lrs[3] == pytest.approx(1.7783e-3, rel=1e-4)
    assert all(isinstance(x, float) for x in lrs)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([10 ** 0.75] * 4)
    assert log_spaced(1e-4, 1e-4, 1) == pytest.approx([1e-4])


# ---------------------------------------------------------------- score_curve


def test_score_is_the_mean_of_the_last_k():
    s = score_curve([5.0, 4.0, 3.0, 2.0, 2.2, 1.8], start_loss=6.0, last=3)
    assert s["score"] == pytest.approx(2.0)
    assert s["diverged"] is False and s["why"] == ""
    assert score_curve([5.0, 4.0, 3.0], 6.0, last=1)["score"] == pytest.approx(3.0)
    assert score_curve([5.0, 4.0], 6.0, last=10)["score"] == pytest.approx(4.5)  # fewer than k


@pytest.mark.parametrize("curve", [[2.0, NAN, 1.0], [2.0, 1.0, NAN], [2.0, INF, 1.0], [2.0, 1.0, -INF]])
def test_non_finite_curve_is_diverged(curve):
    s = score_curve(curve, start_loss=3.0, last=2)
    assert s["diverged"] is True
    assert s["score"] == INF
    assert "non-finite" in s["why"]


def test_last_loss_above_the_start_is_diverged():
    s = score_curve([0.5, 0.5, 3.5], start_loss=3.0, last=3)
    assert s["diverged"] is True
    assert s["score"] == pytest.approx(1.5)  # its score alone would be good
    assert "above the start" in s["why"]
    # equal to the start is not above it
    assert score_curve([3.0, 3.0], 3.0, 2)["diverged"] is False


def test_empty_curve_is_diverged():
    s = score_curve([], 3.0, 2)
    assert s["diverged"] is True and s["score"] == INF


# ---------------------------------------------------------------- select_lr


def test_diverged_runs_never_win_even_with_a_low_score():
    pts = [
        {"lr": 1e-5, "curve": [2.9, 2.8, 2.7, 2.6]},  # score 2.7 (last 3)
        {"lr": 1e-4, "curve": [2.5, 2.2, 2.0, 1.9]},  # score 2.033: the real winner
        {"lr": 1e-3, "curve": [0.1, 0.1, 0.1, 3.5]},  # score 1.233 but ends above the start
        {"lr": 1e-2, "curve": [0.1, 0.05, NAN, 0.01]},  # NaN
        {"lr": 1e-1, "curve": [0.1, INF, 0.05, 0.01]},  # Inf
    ]
    res = select_lr(pts, start_loss=3.0, last=3)
    assert res["lr"] == 1e-4
    by_lr = {s["lr"]: s for s in res["scored"]}
    assert [by_lr[lr]["diverged"] for lr in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)] == [False, False, True, True, True]
    assert by_lr[1e-3]["score"] < by_lr[1e-4]["score"]
    assert by_lr[1e-4]["score"] == pytest.approx((2.2 + 2.0 + 1.9) / 3)
    assert "3 of 5 diverged" in res["reason"]


def test_noisy_curves_are_scored_by_the_mean_of_the_last_k():
    noisy = {"lr": 1e-3, "curve": [1.5, 1.0, 1.4, 0.6]}  # lowest last value, mean of last 3 = 1.0
    steady = {"lr": 1e-4, "curve": [1.5, 0.9, 0.9, 0.9]}  # mean of last 3 = 0.9
    assert select_lr([noisy, steady], start_loss=2.0, last=3)["lr"] == 1e-4
    assert select_lr([noisy, steady], start_loss=2.0, last=1)["lr"] == 1e-3
    res = select_lr([noisy, steady], start_loss=2.0, last=3)
    assert "0.1000 below the next" in res["reason"]


def test_all_diverged_gives_no_lr_and_a_reason():
    pts = [{"lr": 1e-3, "curve": [NAN]}, {"lr": 1e-2, "curve": [2.0, 5.0]}, {"lr": 1e-1, "curve": [INF, INF]}]
    res = select_lr(pts, start_loss=3.0, last=2)
    assert res["lr"] is None
    assert "diverged" in res["reason"]
    assert len(res["scored"]) == 3 and all(s["diverged"] for s in res["scored"])


def test_flat_curves():
    # every run stays at the start: none diverged, equal scores, the smallest LR wins the tie
    flat = [{"lr": lr, "curve": [3.0, 3.0, 3.0]} for lr in (1e-2, 1e-4, 1e-3)]
    res = select_lr(flat, start_loss=3.0, last=2)
    assert res["lr"] == 1e-4
    assert all(not s["diverged"] and s["score"] == pytest.approx(3.0) for s in res["scored"])
    # a flat run loses to one that learned
    res = select_lr(flat + [{"lr": 1e-5, "curve": [3.0, 2.9, 2.8]}], start_loss=3.0, last=2)
    assert res["lr"] == 1e-5


def test_single_run():
    res = select_lr([{"lr": 3e-4, "curve": [2.0, 1.0]}], start_loss=3.0, last=2)
    assert res["lr"] == 3e-4
    assert "below the next" not in res["reason"]


# ---------------------------------------------------------------- refine_grid


def test_refine_grid_geometric_midpoints_around_the_winner():
    lrs = log_spaced(1e-5, 1e-2, 5)
    assert refine_grid(lrs, lrs[2]) == pytest.approx([10 ** -3.875, 10 ** -3.125])
    # at the ends: half a grid step outside, on the same log spacing
    assert refine_grid(lrs, lrs[0]) == pytest.approx([10 ** -5.375, 10 ** -4.625])
    assert refine_grid(lrs, lrs[4]) == pytest.approx([10 ** -2.375, 10 ** -1.625])
    # the order of the input does not matter
    assert refine_grid(list(reversed(lrs)), lrs[2]) == pytest.approx([10 ** -3.875, 10 ** -3.125])


def test_refine_grid_new_rates_are_new_and_bracket_the_winner():
    lrs = log_spaced(1e-5, 1e-2, 5)
    for w in lrs:
        lo, hi = refine_grid(lrs, w)
        assert lo < w < hi
        assert math.log10(hi) - math.log10(w) == pytest.approx(0.375)
        assert math.log10(w) - math.log10(lo) == pytest.approx(0.375)
        assert not any(math.isclose(x, l) for x in (lo, hi) for l in lrs)
