"""Exact resume: N steps straight equal N/2, stop, resume, N/2 (bit for bit on CPU)."""
from helpers import newest_state, run, same_tensors, tiny_config

BASE = dict(data__max_records=80, train__epochs=3, train__grad_accum=4, train__save_every=1)


def _compare(a, b):
    assert same_tensors(a["model_state"], b["model_state"]) == []
    assert same_tensors(a["ema"]["shadow"], b["ema"]["shadow"]) == []
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert same_tensors(sa, sb) == []
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    strip = lambda h: [{k: r[k] for k in ("epoch", "global_step", "lr", "train", "val", "val_ema")} for r in h]
    assert strip(a["history"]) == strip(b["history"])


def test_stop_mid_epoch_then_resume_equals_the_straight_run(tmp_path):
    assert run(tiny_config(tmp_path / "a", **BASE), analysis=False) == 0
    straight = newest_state(tmp_path / "a")
    assert straight["finished"] and straight["global_step"] > 10

    stop_at = straight["global_step"] // 2 + 1  # inside the second epoch
    assert run(tiny_config(tmp_path / "b", **BASE), analysis=False, faults={"stop_at_step": stop_at}) == 75
    mid = newest_state(tmp_path / "b")
    assert mid["global_step"] == stop_at and not mid["finished"] and mid["step_in_epoch"] > 0
    assert run(tiny_config(tmp_path / "b", **BASE), resume="latest", analysis=False) == 0
    resumed = newest_state(tmp_path / "b")
    _compare(straight, resumed)
    # the interrupted epoch's samples/s counts its training time before the stop as well
    epoch = resumed["history"][mid["epoch"]]
    assert mid["epoch_elapsed_s"] > 0 and epoch["seconds"] >= mid["epoch_elapsed_s"]
    assert epoch["samples_per_s"] == epoch["samples"] / epoch["seconds"]
    # ... decisively: a state saying 1000 s had passed gives an epoch of at least 1000 s
    from redheart.ckpt.state import RunPaths
    from redheart.session import build_session
    from redheart.train.trainer import Trainer

    cfg = tiny_config(tmp_path / "c", **BASE)
    session = build_session(cfg)
    trainer = Trainer(cfg, RunPaths(tmp_path / "c", "elapsed"), session.data, session.features, session.device)
    trainer.paths.make()
    trainer.restore({**mid, "epoch_elapsed_s": 1000.0})
    history = trainer.fit()
    assert history[mid["epoch"]]["seconds"] >= 1000 > history[-1]["seconds"]


def test_stop_at_an_epoch_boundary_and_resume_from_the_path(tmp_path):
    assert run(tiny_config(tmp_path / "a", **BASE), analysis=False) == 0
    straight = newest_state(tmp_path / "a")
    per_epoch = straight["history"][0]["global_step"]
    assert run(tiny_config(tmp_path / "b", **BASE), analysis=False, faults={"stop_at_step": per_epoch}) == 75
    from redheart.ckpt.state import read_registry

    path = read_registry(tmp_path / "b")[-1]["path"]
    assert run(tiny_config(tmp_path / "b", **BASE), resume=path, analysis=False) == 0
    _compare(straight, newest_state(tmp_path / "b"))


def test_a_fresh_start_over_an_unfinished_run_is_refused_with_a_way_out(tmp_path):
    import pytest

    from redheart.run import UsageError

    assert run(tiny_config(tmp_path, **BASE), analysis=False, faults={"stop_at_step": 2}) == 75
    with pytest.raises(UsageError, match="--resume latest"):
        run(tiny_config(tmp_path, **BASE), analysis=False)
    assert run(tiny_config(tmp_path, **BASE), analysis=False, restart=True) == 0
