"""The node-wide association count shared by receiver processes (listener.association_count)."""

from __future__ import annotations

import logging
import multiprocessing
import time

import pytest

from listener.association_count import SharedAssociationCount


def _pair(limit: int) -> tuple[SharedAssociationCount, SharedAssociationCount, object, object]:
    counts, lock = SharedAssociationCount.allocate(multiprocessing.get_context("spawn"), 2)
    return (SharedAssociationCount(counts, lock, 0, limit), SharedAssociationCount(counts, lock, 1, limit),
            counts, lock)


def test_the_limit_is_shared_and_released_slots_are_reused() -> None:
    a, b, counts, _ = _pair(3)
    assert a.try_admit() and a.try_admit() and b.try_admit()
    assert not a.try_admit() and not b.try_admit()
    assert list(counts) == [2, 1] and sum(counts) == 3
    a.release()
    assert b.try_admit() and list(counts) == [1, 2]
    # a dead receiver's associations are forgotten when the parent resets its slot
    SharedAssociationCount.reset(counts, 1)
    assert a.try_admit() and a.try_admit() and sum(counts) == 3
    b.release()  # never below zero, whatever the order of events around a reset
    assert list(counts) == [3, 0]


def test_a_lock_never_released_delays_but_does_not_refuse(caplog: pytest.LogCaptureFixture) -> None:
    a, _, _, lock = _pair(2)
    lock.acquire()  # as if a receiver had been killed while holding it
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="listener.association_count"):
        assert a.try_admit()
    assert 0.4 < time.monotonic() - started < 5
    assert "lock not released" in caplog.text
    assert a.try_admit() and not a.try_admit()  # the limit still holds on the unlocked count


def test_bad_arguments_are_refused() -> None:
    counts, lock = SharedAssociationCount.allocate(multiprocessing.get_context("spawn"), 2)
    with pytest.raises(ValueError, match="index 2"):
        SharedAssociationCount(counts, lock, 2, 4)
    with pytest.raises(ValueError, match="at least 1"):
        SharedAssociationCount(counts, lock, 0, 0)
