"""Which epoch snapshots to delete: a pure function of the entries, the limit and the pins.

Pinned snapshots (Sweet Spot choices and candidates, what a resume needs) are never deleted;
the oldest unpinned ones go first until at most `keep` remain. When the pins alone exceed the
limit, every unpinned snapshot goes and the pinned ones stay (the caller logs it).
"""
from __future__ import annotations

from typing import Any


def select_deletions(entries: list[dict[str, Any]], keep: int, pinned: set[str]) -> list[str]:
    """Paths to delete, oldest first. Entries need `path` and `timestamp` (then `epoch`)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep})")
    excess = len(entries) - keep
    if excess <= 0:
        return []
    oldest_first = sorted(entries, key=lambda e: (str(e.get("timestamp", "")), int(e.get("epoch", 0))))
    out = []
    for e in oldest_first:
        if len(out) == excess:
            break
        if e["path"] not in pinned:
            out.append(e["path"])
    return out
