"""Batching across instances with a bounded wait (``detector.batch_wait_ms``).

Behaviour, not speed: a fake queue and a fake detector that records the size and time
of every batch. The time bounds have wide margins (a lone instance is scored after the
wait and well before ten times the wait) so that a loaded machine does not fail them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

import listener.pipeline as pipeline_mod
from detector.detector import Verdict
from listener.config import parse_config
from listener.pipeline import Pipeline
from listener.spool_decode import SpoolDecoded


class FakeRepo:
    """The ``instances`` queue in memory: ``claim_received`` takes the oldest received rows."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: list[SimpleNamespace] = []
        self._next_id = 1
        self.claims: list[tuple[int, int]] = []  # (limit, rows returned)
        self.verdicts: dict[int, float] = {}  # instance id -> monotonic time its verdict was recorded

    def add(self, n: int = 1) -> list[int]:
        ids = []
        with self._lock:
            for _ in range(n):
                rid = self._next_id
                self._next_id += 1
                self._received.append(SimpleNamespace(id=rid, sop_instance_uid=f"1.2.3.{rid}", spool_path=f"{rid}.dcm"))
                ids.append(rid)
        return ids

    def claim_received(self, worker: str, limit: int) -> list[SimpleNamespace]:
        with self._lock:
            taken, self._received = self._received[:limit], self._received[limit:]
            self.claims.append((limit, len(taken)))
            return taken

    def record_verdicts(self, items: Sequence[Any], *, worker: str) -> list[None]:
        for item in items:
            self.verdicts[item.instance_id] = time.monotonic()
        return [None] * len(items)

    def mark_failed(self, instance_id: int, reason: str) -> None:  # pragma: no cover - not expected here
        raise AssertionError(f"instance {instance_id} failed: {reason}")


class FakeDetector:
    preprocess_config = SimpleNamespace(decode_limits=lambda: None)

    def __init__(self) -> None:
        self.batches: list[tuple[float, list[Any]]] = []  # (monotonic time, images)

    def score_prepared(self, images: Sequence[Any]) -> list[Verdict]:
        self.batches.append((time.monotonic(), list(images)))
        return [
            Verdict(0.1, "real", 0.5, 0.1, None, 1, "fake", "0.0.0", "fake@0.0.0", 1.0) for _ in images
        ]

    @property
    def sizes(self) -> list[int]:
        return [len(images) for _, images in self.batches]


class FakeSpool:
    def resolve(self, path: str) -> str:
        return path


@pytest.fixture(autouse=True)
def _no_files(monkeypatch: pytest.MonkeyPatch) -> None:
    # the "prepared image" is the instance id (the spool path is "<id>.dcm"): no file, no DICOM decoding
    monkeypatch.setattr(pipeline_mod, "decode_outcome", lambda path, source, limits: SpoolDecoded(path, None))
    monkeypatch.setattr(pipeline_mod, "_prepare_decoded", lambda decoded, cfg: int(decoded.removesuffix(".dcm")))


def _pipeline(batch_size: int, wait_ms: float, poll: float = 5.0) -> tuple[Pipeline, FakeRepo, FakeDetector]:
    cfg = parse_config(
        {
            # decoding in the worker thread: the fake "prepared image" is the instance id
            "detector": {"batch_size": batch_size, "batch_wait_ms": wait_ms, "workers": 1, "decode_processes": 0},
            # a long poll: only wake() (a store) makes an idle worker look at the queue promptly
            "processing": {"poll_interval_seconds": poll},
        }
    )
    repo, det = FakeRepo(), FakeDetector()
    return Pipeline(repo, det, FakeSpool(), cfg), repo, det


@pytest.fixture
def started() -> Iterator[list[Pipeline]]:
    running: list[Pipeline] = []
    yield running
    for p in running:
        p.stop(timeout=10)


def _wait_until(condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def test_default_and_validation() -> None:
    assert parse_config({}).detector.batch_wait_ms == 50
    assert parse_config({"detector": {"batch_wait_ms": 0}}).detector.batch_wait_ms == 0
    with pytest.raises(Exception, match="batch_wait_ms"):
        parse_config({"detector": {"batch_wait_ms": -1}})


def test_instances_arriving_within_the_window_fill_the_batch(started: list[Pipeline]) -> None:
    """Eight stores 20 ms apart (140 ms in all) inside a 1 s window: one batch of eight."""
    pipe, repo, det = _pipeline(batch_size=8, wait_ms=1000)
    pipe.start()
    started.append(pipe)
    for _ in range(8):
        repo.add()
        pipe.wake()
        time.sleep(0.02)
    _wait_until(lambda: len(repo.verdicts) == 8, timeout=10)
    assert det.sizes == [8]
    # the worker claimed as the stores came in, not once at the end of the window
    assert len(repo.claims) >= 2


def test_series_longer_than_a_batch_is_scored_in_full_batches(started: list[Pipeline]) -> None:
    pipe, repo, det = _pipeline(batch_size=4, wait_ms=1000)
    pipe.start()
    started.append(pipe)
    for _ in range(12):
        repo.add()
        pipe.wake()
        time.sleep(0.01)
    _wait_until(lambda: len(repo.verdicts) == 12, timeout=10)
    assert det.sizes == [4, 4, 4]


def test_a_lone_instance_waits_at_most_the_window(started: list[Pipeline]) -> None:
    wait = 0.2
    pipe, repo, det = _pipeline(batch_size=8, wait_ms=wait * 1000)
    pipe.start()
    started.append(pipe)
    time.sleep(0.05)  # the worker is idle, waiting for a store
    t0 = time.monotonic()
    (rid,) = repo.add()
    pipe.wake()
    _wait_until(lambda: rid in repo.verdicts, timeout=10 * wait + 5)
    delay = repo.verdicts[rid] - t0
    assert det.sizes == [1]
    assert delay >= wait * 0.95, f"scored after {delay:.3f} s, before the {wait} s window ended"
    assert delay < 10 * wait, f"scored after {delay:.3f} s, far beyond the {wait} s window"


def test_zero_turns_the_wait_off(started: list[Pipeline]) -> None:
    pipe, repo, det = _pipeline(batch_size=8, wait_ms=0)
    pipe.start()
    started.append(pipe)
    time.sleep(0.05)
    t0 = time.monotonic()
    (rid,) = repo.add()
    pipe.wake()
    _wait_until(lambda: rid in repo.verdicts, timeout=10)
    assert det.sizes == [1]
    assert [n for _, n in repo.claims if n] == [1]  # one claim, no top-up attempts
    assert repo.verdicts[rid] - t0 < 2.0  # scored on the store's wake, not at the 5 s poll


def test_a_full_claim_does_not_wait(started: list[Pipeline]) -> None:
    pipe, repo, det = _pipeline(batch_size=4, wait_ms=5000)
    repo.add(4)
    t0 = time.monotonic()
    assert pipe.run_once("w") == 4
    assert time.monotonic() - t0 < 2.0
    assert det.sizes == [4]
    assert len(repo.claims) == 1


def test_run_once_tops_up_a_short_claim_without_a_wake() -> None:
    """No wake() at all: the worker still claims again when the window ends, and scores what is there."""
    pipe, repo, det = _pipeline(batch_size=4, wait_ms=150)
    repo.add(1)

    def later() -> None:
        time.sleep(0.03)
        repo.add(2)  # stored, but nobody calls wake()

    threading.Thread(target=later).start()
    assert pipe.run_once("w") == 3
    assert det.sizes == [3]


def test_stop_ends_the_wait_and_scores_the_claimed_rows(started: list[Pipeline]) -> None:
    pipe, repo, det = _pipeline(batch_size=8, wait_ms=5000)
    pipe.start()
    time.sleep(0.05)
    (rid,) = repo.add()
    pipe.wake()
    _wait_until(lambda: any(n for _, n in repo.claims), timeout=5)  # the row is claimed: the window is open
    t0 = time.monotonic()
    pipe.stop(timeout=10)
    assert time.monotonic() - t0 < 2.5, "stop() waited out the 5 s batch window"
    assert rid in repo.verdicts  # the claimed row is scored, not left in analysing
    assert det.sizes == [1]
