"""Shared fixtures for the test suite."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

# The public corpus (read-only), beside the project: /work/shared/data for /work/main.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def write_file(tmp_path):
    """write_file(name, content) -> Path under tmp_path.

    content: str (written as UTF-8), bytes (written as is) or a list of lines, each a str or a
    JSON-serialisable object (one JSON document a line, each line ending with a newline).
    A name ending in .gz is gzip-compressed.
    """

    def write(name: str, content) -> Path:
        if isinstance(content, list):
            content = "".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n"
                              for x in content)
        data = content.encode("utf-8") if isinstance(content, str) else content
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".gz"):
            data = gzip.compress(data)
        path.write_bytes(data)
        return path

    return write


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished tiny run (2 epochs, a snapshot each, Sweet Spot and Crossover) shared by the
    tests that read a run's outputs: (output directory, run id)."""
    from helpers import run, tiny_config

    root = tmp_path_factory.mktemp("tiny_run")
    cfg = tiny_config(root, data__max_records=60, train__epochs=2, train__save_every=1)
    assert run(cfg) == 0
    (metrics,) = (root / "logs").glob("metrics_*.jsonl")
    return root, metrics.stem.removeprefix("metrics_")
