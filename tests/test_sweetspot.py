"""Sweet Spot on made-up validation histories (pure functions, no model)."""
from __future__ import annotations

import math

import pytest

from redheart.ckpt.sweetspot import analyse, best_epoch, find_sweet_spot, pinned_epochs, smooth_curve
from redheart.config import preset

EPOCHS = list(range(1, 21))


def bowl(centre: float, depth: float = 1.0, base: float = 1.0, width: float = 10.0) -> list[float]:
    """A clean U-shaped loss curve with its minimum `base` at epoch `centre`."""
    return [base + depth * (e - centre) ** 2 / width for e in EPOCHS]


# A descent, then a noisy plateau around 1.0 from epoch 5 on (a fixed, hand-written noise).
NOISE = [0.03, -0.04, 0.05, -0.02, 0.04, -0.05, 0.02, -0.03, 0.05, -0.04, 0.01, -0.05, 0.04, -0.02, 0.03, -0.01]
NOISY_PLATEAU = [3.0, 2.0, 1.5, 1.2] + [1.0 + n for n in NOISE]


# ---------------------------------------------------------------- find_sweet_spot


def test_clear_minimum_lands_on_it_with_high_confidence():
    res = find_sweet_spot(EPOCHS, bowl(8))
    assert res["epoch"] == 8
    assert res["value"] == pytest.approx(1.0)
    assert res["plateau"] == [8]
    assert res["still_improving"] is False
    assert res["confidence"] > 0.8


def test_clear_minimum_off_centre():
    res = find_sweet_spot(EPOCHS, bowl(13, depth=3.0))
    assert res["epoch"] == 13


def test_noisy_plateau_lands_inside_it_with_lower_confidence():
    res = find_sweet_spot(EPOCHS, NOISY_PLATEAU)
    clean = find_sweet_spot(EPOCHS, bowl(8))
    assert 5 <= res["epoch"] <= 20  # inside the plateau, not in the descent
    assert set(res["plateau"]) <= set(range(5, 21))
    assert res["epoch"] == res["plateau"][0]  # the earliest epoch of the plateau
    assert 0.0 <= res["confidence"] < clean["confidence"]
    assert res["confidence"] < 0.6
    # the raw value reported is the raw value of the chosen epoch
    assert res["value"] == pytest.approx(NOISY_PLATEAU[res["epoch"] - 1])


def test_plateau_picks_the_earliest_epoch_within_tolerance():
    # 2.0 down to 1.0 at epoch 7, then a flat plateau whose best part (0.995) is at epochs 12-14
    values = [2.0, 1.8, 1.6, 1.4, 1.2, 1.1] + [1.0] * 5 + [0.995] * 3 + [1.0] * 6
    res = find_sweet_spot(EPOCHS, values)
    assert res["still_improving"] is False
    assert res["epoch"] == 8  # the first epoch whose smoothed value is within 1% of 0.995
    assert res["plateau"] == list(range(8, 21))
    # with no tolerance the very best smoothed epoch wins
    assert find_sweet_spot(EPOCHS, values, tolerance=0.0)["epoch"] == 13


def test_monotone_improvement_lands_at_the_end_and_reports_still_improving():
    values = [3.0 - 0.1 * i for i in range(20)]
    res = find_sweet_spot(EPOCHS, values)
    assert res["epoch"] == 20
    assert res["still_improving"] is True
    assert "still improving" in res["reason"]
    # a noise-free curve would have confidence 1; it is halved because it still improves
    assert res["confidence"] == pytest.approx(0.5)


def test_slow_steady_improvement_still_lands_at_the_end():
    # each epoch improves by less than the 1% plateau tolerance, but the trend is significant
    values = [3.0 - 0.02 * e for e in EPOCHS]
    res = find_sweet_spot(EPOCHS, values)
    assert res["still_improving"] is True
    assert res["epoch"] == 20
    assert res["value"] == pytest.approx(2.6)
    assert res["confidence"] == pytest.approx(0.5)
    # with even-epoch snapshots only: the last snapshot
    assert find_sweet_spot(EPOCHS, values, candidates={e for e in EPOCHS if e % 2 == 0})["epoch"] == 20


def test_short_history_is_not_called_still_improving():
    # 8 epochs: the last half has 4 points, too few for the trend test at p < 0.05
    res = find_sweet_spot(list(range(1, 9)), [3.0 - 0.1 * e for e in range(1, 9)])
    assert res["still_improving"] is False
    assert res["epoch"] == 8


def test_not_still_improving_when_the_curve_turns_up():
    res = find_sweet_spot(EPOCHS, bowl(10))
    assert res["still_improving"] is False


def test_one_epoch_spike_down_in_the_middle_is_not_chosen():
    values = bowl(6, depth=2.0)
    values[13] = 0.1  # epoch 14: far below everything, for one epoch only
    res = find_sweet_spot(EPOCHS, values)
    assert res["epoch"] != 14
    assert res["epoch"] == 6
    assert "raw minimum at epoch 14 was not kept" in res["reason"]


def test_one_epoch_spike_down_at_the_last_epoch_is_not_chosen():
    # converged at 1.0 from epoch 5 on; the last evaluation alone drops to 0.4
    plain = [2.0, 1.6, 1.3, 1.1] + [1.0] * 16
    expected = find_sweet_spot(EPOCHS, plain)["epoch"]
    assert expected == 6  # the first epoch whose smoothed value is within 1% of 1.0
    values = plain[:19] + [0.4]
    res = find_sweet_spot(EPOCHS, values)
    assert res["epoch"] != 20
    assert res["epoch"] == expected
    # ... and at the second-to-last epoch (it must not leak into the last one either)
    values = plain[:18] + [0.4, 1.0]
    res = find_sweet_spot(EPOCHS, values)
    assert res["epoch"] == expected


def test_one_epoch_spike_down_at_the_first_epoch_is_not_chosen():
    values = bowl(10)
    values[0] = 0.0
    assert find_sweet_spot(EPOCHS, values)["epoch"] == 10


def test_two_epoch_drop_at_the_end_is_kept():
    # borne out by a neighbour: a real improvement, not a spike
    values = [2.0, 1.6, 1.3, 1.1] + [1.0] * 14 + [0.5, 0.5]
    res = find_sweet_spot(EPOCHS, values)
    assert res["epoch"] in (19, 20)


def test_smooth_curve_removes_a_single_spike_everywhere():
    flat = [1.0] * 9
    for i in range(9):
        y = list(flat)
        y[i] = 0.0
        assert min(smooth_curve(y, 3)) > 0.6, i


def test_higher_is_better():
    acc = [0.9 - (e - 12) ** 2 / 20 for e in EPOCHS]
    res = find_sweet_spot(EPOCHS, acc, higher_is_better=True)
    assert res["epoch"] == 12
    assert res["value"] == pytest.approx(0.9)  # the raw value, with its own sign
    assert res["smoothed"] > 0
    # the same curve read as a loss picks an end, not the peak
    assert find_sweet_spot(EPOCHS, acc, higher_is_better=False)["epoch"] in (1, 20)


def test_higher_is_better_spike_up_not_chosen_and_still_improving():
    acc = [0.1 + 0.04 * e for e in EPOCHS]  # rising to the end
    res = find_sweet_spot(EPOCHS, acc, higher_is_better=True)
    assert res["epoch"] == 20
    assert res["still_improving"] is True
    assert res["confidence"] == pytest.approx(0.5)
    peak = [0.9 - (e - 8) ** 2 / 20 for e in EPOCHS]
    peak[15] = 1.5
    assert find_sweet_spot(EPOCHS, peak, higher_is_better=True)["epoch"] == 8


def test_candidates_limited_to_even_epochs():
    values = bowl(7, depth=2.0)  # the true minimum is at an odd epoch
    evens = {e for e in EPOCHS if e % 2 == 0}
    res = find_sweet_spot(EPOCHS, values, candidates=evens)
    assert res["epoch"] in (6, 8)
    assert all(e % 2 == 0 for e in res["plateau"])
    assert find_sweet_spot(EPOCHS, values)["epoch"] == 7
    # a clear minimum at an even epoch is kept
    assert find_sweet_spot(EPOCHS, bowl(10, depth=2.0), candidates=evens)["epoch"] == 10


def test_no_candidate_among_validated_epochs():
    res = find_sweet_spot(EPOCHS, bowl(8), candidates={100, 200})
    assert res["epoch"] is None
    assert res["confidence"] == 0.0


def test_non_finite_values_are_ignored():
    values = bowl(8)
    values[2] = -math.inf  # would win if it were read
    values[5] = math.nan
    values[15] = math.inf
    values[8] = None
    res = find_sweet_spot(EPOCHS, values)
    assert res["epoch"] == 8
    assert math.isfinite(res["value"]) and math.isfinite(res["confidence"])
    keep = [i for i in range(20) if i not in (2, 5, 8, 15)]
    same = find_sweet_spot([EPOCHS[i] for i in keep], [values[i] for i in keep])
    assert res == same


def test_no_finite_values():
    res = find_sweet_spot([1, 2, 3], [math.nan, math.inf, -math.inf])
    assert res["epoch"] is None
    assert res["confidence"] == 0.0


# ---------------------------------------------------------------- analyse / pinned / best epoch


def make_history(n: int, minima: dict[str, int], with_ema: bool = False, ema_shift: int = 0,
                 missing: tuple[str, ...] = ()) -> list[dict]:
    """Records of `n` epochs whose metric `key` has a clean minimum at epoch minima[key]."""
    out = []
    for e in range(1, n + 1):
        val = {k: 1.0 + 3.0 * (e - m) ** 2 / n for k, m in minima.items() if k not in missing}
        ema = ({k: 1.0 + 3.0 * (e - (m + ema_shift)) ** 2 / n for k, m in minima.items() if k not in missing}
               if with_ema else None)
        out.append({"epoch": e, "val": val, "val_ema": ema})
    return out


MINIMA = {"loss": 6, "emotion_loss": 4, "bentham_loss": 8, "regret_loss": 10, "surd_loss": 12}


def test_analyse_gives_every_module_its_own_epoch():
    cfg = preset("tiny")
    hist = make_history(16, MINIMA)
    res = analyse(hist, None, cfg)
    assert {m: r["epoch"] for m, r in res.items()} == {
        "backbone": 6, "emotion": 4, "bentham": 8, "regret": 10, "surd": 12}
    assert res["backbone"]["metric"] == "loss"
    assert res["surd"]["metric"] == "surd_loss"
    assert all(r["no_targets"] is False for r in res.values())
    assert res["bentham"]["curve"]["epochs"] == list(range(1, 17))


def test_analyse_module_without_targets_is_marked_and_left_out():
    cfg = preset("tiny")
    hist = make_history(16, MINIMA, missing=("surd_loss",))
    res = analyse(hist, None, cfg)
    assert res["surd"]["no_targets"] is True
    assert res["surd"]["epoch"] is None
    assert res["surd"]["confidence"] == 0.0
    assert res["emotion"]["epoch"] == 4 and res["emotion"]["no_targets"] is False
    # pins: the others' sweet spots and the best combined-loss epoch; nothing for surd
    cfg.train.epochs = 16
    assert pinned_epochs(hist, cfg) == {4, 6, 8, 10}


def test_analyse_ema_weights_read_val_ema():
    cfg = preset("tiny")
    hist = make_history(16, MINIMA, with_ema=True, ema_shift=2)
    raw = analyse(hist, None, cfg, weights="raw")
    ema = analyse(hist, None, cfg, weights="ema")
    assert raw["emotion"]["epoch"] == 4
    assert ema["emotion"]["epoch"] == 6
    assert ema["regret"]["epoch"] == 12
    # without EMA records every module has no targets under "ema"
    none = analyse(make_history(16, MINIMA), None, cfg, weights="ema")
    assert all(r["no_targets"] and r["epoch"] is None for r in none.values())


def test_pinned_epochs_uses_even_snapshot_epochs_and_the_best_loss_epoch():
    cfg = preset("tiny")
    cfg.train.epochs = 15
    minima = {"loss": 7, "emotion_loss": 4, "bentham_loss": 8, "regret_loss": 10, "surd_loss": 12}
    hist = make_history(15, minima)
    pins = pinned_epochs(hist, cfg)
    # snapshots exist at even epochs and at the last planned one (15); loss min at 7 -> 6 or 8
    assert pins <= {2, 4, 6, 8, 10, 12, 14, 15}
    assert {4, 8, 10, 12} <= pins
    assert pins & {6, 8}
    assert 7 not in pins
    assert pinned_epochs([], cfg) == set()


def test_pinned_epochs_include_the_plateau():
    cfg = preset("tiny")
    cfg.train.epochs = 12
    flat = [3.0, 2.0, 1.5, 1.2] + [1.0] * 8
    hist = [{"epoch": e, "val": {k: flat[e - 1] for k in MINIMA}, "val_ema": None} for e in range(1, 13)]
    pins = pinned_epochs(hist, cfg)
    assert pins == {6, 8, 10, 12}


def test_best_epoch():
    hist = make_history(10, {"loss": 5})
    assert best_epoch(hist, set(range(1, 11))) == 5
    assert best_epoch(hist, {2, 4, 8}) == 4
    assert best_epoch(hist, {100}) is None
    hist[4]["val"]["loss"] = math.nan
    assert best_epoch(hist, set(range(1, 11))) in (4, 6)
    # ties: the earliest
    flat = [{"epoch": e, "val": {"loss": 1.0}, "val_ema": None} for e in range(1, 6)]
    assert best_epoch(flat, {2, 3, 4}) == 2
