"""Failures injected by the test suite: REDHEART_FAULTS='{"oom_at_step": 3}' in the environment.

The training commands read them once (`from_env`) and hand them to the run, which passes them
on to the trainer and to `redheart.ckpt.io`; without the variable there are none.
"""
from __future__ import annotations

import json
import os
from typing import Any

from redheart.overrides import ConfigError


def from_env() -> dict[str, Any]:
    """The injected failures, empty when REDHEART_FAULTS is unset or empty."""
    raw = os.environ.get("REDHEART_FAULTS", "")
    if not raw:
        return {}
    try:
        faults = json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError(f"REDHEART_FAULTS: not valid JSON: {raw!r}") from None
    if not isinstance(faults, dict):
        raise ConfigError("REDHEART_FAULTS: expected a JSON object")
    return faults
