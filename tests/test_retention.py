"""Retention of epoch snapshots: select_deletions (pure)."""
from __future__ import annotations

import random

import pytest

from redheart.ckpt.retention import select_deletions


def entry(epoch: int, ts: str | None = None) -> dict:
    return {"epoch": epoch, "path": f"/ck/checkpoint_epoch_{epoch:04d}.pt",
            "timestamp": ts if ts is not None else f"2025-01-01T00:{epoch // 60:02d}:{epoch % 60:02d}.000000"}


def path(epoch: int) -> str:
    return entry(epoch)["path"]


def snapshots(n: int) -> list[dict]:
    """n snapshots at the even epochs 2, 4, ..., 2n, saved in that order."""
    return [entry(2 * i) for i in range(1, n + 1)]


def test_nothing_deleted_within_the_limit():
    assert select_deletions(snapshots(30), 30, set()) == []
    assert select_deletions(snapshots(3), 30, set()) == []
    assert select_deletions([], 1, set()) == []


def test_keeps_at_most_n_deleting_the_oldest_first():
    doomed = select_deletions(snapshots(35), 30, set())
    assert doomed == [path(e) for e in (2, 4, 6, 8, 10)]
    assert select_deletions(snapshots(5), 1, set()) == [path(e) for e in (2, 4, 6, 8)]


def test_sweet_spot_pinned_at_epoch_2_survives():
    """The earlier implementation deleted the oldest snapshot that the crossover then read."""
    entries = snapshots(35)
    doomed = select_deletions(entries, 30, {path(2)})
    assert path(2) not in doomed
    assert doomed == [path(e) for e in (4, 6, 8, 10, 12)]
    assert len(entries) - len(doomed) == 30


def test_pins_anywhere_are_skipped_and_the_next_oldest_goes():
    entries = snapshots(12)
    pins = {path(2), path(6), path(8), path(20)}
    doomed = select_deletions(entries, 8, pins)
    assert doomed == [path(e) for e in (4, 10, 12, 14)]
    assert not set(doomed) & pins


def test_pinned_above_the_limit_deletes_all_unpinned_and_keeps_the_pinned():
    entries = snapshots(10)
    pins = {path(e) for e in (4, 8, 12, 16, 20)}
    doomed = select_deletions(entries, 3, pins)
    assert doomed == [path(e) for e in (2, 6, 10, 14, 18)]
    assert not set(doomed) & pins
    # everything pinned: nothing at all may go
    assert select_deletions(entries, 3, {e["path"] for e in entries}) == []


def test_order_is_by_timestamp_not_by_list_position():
    entries = snapshots(12)
    random.Random(0).shuffle(entries)
    assert select_deletions(entries, 9, set()) == [path(e) for e in (2, 4, 6)]


def test_equal_timestamps_fall_back_to_the_epoch():
    entries = [entry(e, ts="2025-01-01T00:00:00.000000") for e in (8, 2, 6, 4)]
    assert select_deletions(entries, 2, set()) == [path(2), path(4)]


def test_keep_must_be_positive():
    with pytest.raises(ValueError):
        select_deletions(snapshots(3), 0, set())


def test_training_loop_never_loses_the_pinned_sweet_spot():
    """Save a snapshot every even epoch for 70 epochs, pruning after each save as the trainer
    does, with the sweet spot at epoch 2 and a moving 'best' pin: epoch 2 is always there."""
    on_disk: list[dict] = []
    for epoch in range(2, 141, 2):
        on_disk.append(entry(epoch))
        pins = {path(2), path(max(2, epoch - 10))}
        doomed = set(select_deletions(on_disk, 30, pins))
        assert not doomed & pins
        on_disk = [e for e in on_disk if e["path"] not in doomed]
        assert len(on_disk) <= 30
        assert path(2) in {e["path"] for e in on_disk}
    kept = sorted(e["epoch"] for e in on_disk)
    assert kept == [2] + list(range(84, 141, 2))  # the pin and the 29 newest


def test_oldest_means_saved_first_not_lowest_epoch():
    # an earlier run's late epochs were saved before this run's early ones
    old_run = [{"epoch": e, "path": f"/ck/old_{e}.pt", "timestamp": f"2025-01-01T10:00:{e:02d}.000000"}
               for e in (10, 12, 14)]
    new_run = [{"epoch": e, "path": f"/ck/new_{e}.pt", "timestamp": f"2025-01-02T10:00:{e:02d}.000000"}
               for e in (2, 4, 6)]
    doomed = select_deletions(new_run + old_run, 3, set())
    assert doomed == ["/ck/old_10.pt", "/ck/old_12.pt", "/ck/old_14.pt"]
    assert select_deletions(new_run + old_run, 3, {"/ck/old_12.pt"}) == [
        "/ck/old_10.pt", "/ck/old_14.pt", "/ck/new_2.pt"]
