"""`--batch-size auto`: the largest micro-batch that fits, searched with real forward and
backward passes (out-of-memory injected above a size on the CPU, as a smaller GPU would raise
it), and applied with the accumulation recomputed. (train-local's summary, from the same
search, is tested with train-local in test_unified_cli.py.)"""
from __future__ import annotations

import pytest
import yaml

from helpers import newest_state, run, same_tensors, tiny_config
from redheart.session import build_session
from redheart.train.autobatch import candidates, largest_micro_batch


def test_candidates_split_the_effective_batch_evenly():
    assert candidates(64) == [64, 32, 16, 8, 4, 2, 1]
    assert candidates(12) == [12, 6, 4, 3, 2, 1]


@pytest.mark.parametrize("limit, want", [(16, 16), (5, 4), (1, 1)])
def test_the_search_takes_the_largest_size_that_runs(tmp_path, limit, want):
    cfg = tiny_config(tmp_path, data__max_records=40)
    session = build_session(cfg)
    found = largest_micro_batch(cfg, session.features["train"], session.device, {"oom_above_micro_batch": limit})
    assert found["micro_batch"] == want and found["how"] == "measured"
    tried = found["tried"]
    assert [t["micro_batch"] for t in tried] == [m for m in candidates(16) if m >= want]
    assert all(t.get("out_of_memory") for t in tried[:-1]) and tried[-1]["fits"]


def test_batch_size_auto_trains_as_the_size_it_found(tmp_path):
    """The search's size is what trains: the same weights as giving that size by hand, and the
    run's config file says so (a resume trains alike)."""
    common = dict(data__max_records=60, train__epochs=1, crossover__enabled=False)
    assert run(tiny_config(tmp_path / "auto", train__auto_micro_batch=True, **common), analysis=False,
               faults={"oom_above_micro_batch": 4}) == 0
    assert run(tiny_config(tmp_path / "hand", train__micro_batch=4, train__grad_accum=4, **common),
               analysis=False) == 0
    auto, hand = newest_state(tmp_path / "auto"), newest_state(tmp_path / "hand")
    assert auto["micro_batch"] == 4
    assert same_tensors(auto["model_state"], hand["model_state"]) == []
    (config,) = (tmp_path / "auto" / "logs").glob("config_*.yaml")
    saved = yaml.safe_load(config.read_text())["train"]
    assert (saved["micro_batch"], saved["grad_accum"], saved["auto_micro_batch"]) == (4, 4, False)
