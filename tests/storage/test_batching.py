"""storage.batching.GroupCommit: shared batches, per-caller results, failures reach every caller."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from storage.batching import GroupCommit


def _run_concurrently(n: int, fn) -> list[object]:
    out: list[object] = [None] * n
    barrier = threading.Barrier(n)

    def run(k: int) -> None:
        barrier.wait()
        try:
            out[k] = fn(k)
        except BaseException as exc:  # noqa: BLE001
            out[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_lone_caller_runs_its_own_item() -> None:
    batches: list[list[int]] = []
    gc: GroupCommit[int, int] = GroupCommit(lambda items: batches.append(list(items)) or [i * 2 for i in items])
    assert gc.submit(3) == 6
    assert batches == [[3]]


def test_concurrent_callers_share_batches_and_get_their_own_result() -> None:
    batches: list[list[int]] = []

    def run(items: Sequence[int]) -> list[int]:
        batches.append(list(items))
        time.sleep(0.02)  # a slow commit: the others queue meanwhile
        return [i * 10 for i in items]

    gc: GroupCommit[int, int] = GroupCommit(run)
    out = _run_concurrently(8, gc.submit)
    assert out == [k * 10 for k in range(8)]
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert len(batches) < 8  # at least one batch held several items


def test_a_failed_batch_fails_every_caller_in_it() -> None:
    def run(items: Sequence[int]) -> list[int]:
        time.sleep(0.02)
        raise OSError("disk gone")

    gc: GroupCommit[int, int] = GroupCommit(run)
    out = _run_concurrently(6, gc.submit)
    assert all(isinstance(o, OSError) for o in out)


def test_isolated_failures_fail_only_the_poison_item() -> None:
    def run(items: Sequence[int]) -> list[int]:
        time.sleep(0.01)
        if 3 in items:
            raise ValueError("bad item")
        return list(items)

    gc: GroupCommit[int, int] = GroupCommit(run, isolate_failures=lambda exc: isinstance(exc, ValueError))
    out = _run_concurrently(6, gc.submit)
    assert isinstance(out[3], ValueError)
    assert [o for k, o in enumerate(out) if k != 3] == [0, 1, 2, 4, 5]


def test_wrong_result_count_is_an_error() -> None:
    gc: GroupCommit[int, int] = GroupCommit(lambda items: [])
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        gc.submit(1)
