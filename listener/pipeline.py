"""Worker threads that score received instances.

The queue is the ``instances`` table: a worker claims up to ``detector.batch_size``
``received`` rows (they become ``analysing``), reads each spool file, prepares it
for the model, scores the batch and records one verdict per instance. An instance
whose pixel data cannot be used is marked ``failed`` with the reason: there is
never a silent score. Nothing is kept in memory between batches, so a crash loses
nothing: rows left in ``analysing`` are put back by ``requeue_in_progress``.

Reading and decoding a batch's files runs in the decoding processes
(``detector.decode_processes``, ``listener.decode_pool``), or in the worker itself when
there are none; making the model's views and the forward pass run in the worker. The
forward pass is serialised with a lock because a ``Detector`` scores one call at a time,
so a second worker's batch is decoded while the first one's is scored.

Batching across instances (``detector.batch_wait_ms``): a series arrives over the
network one instance at a time, and a worker woken by the first store would score it
alone. When a claim returns fewer than ``batch_size`` rows, the worker waits up to
``batch_wait_ms`` (woken early by ``wake()``, i.e. by every store) and claims more,
until the batch is full or the time is up; then it scores what it has. A series that
arrives faster than the model scores is thus scored in full batches, and an isolated
instance waits at most ``batch_wait_ms`` longer than without batching. 0 turns the
wait off. The claimed rows are ``analysing`` (in the database) during the wait, so a
crash then loses nothing either.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from listener.config import NodeConfig
from listener.decode_pool import DecodeJob, DecodePool
from listener.spool_decode import (
    DecodeFailure,
    SpoolDecoded,
    decode_outcome,
    failure_reason,
)
from storage.errors import (
    DatabaseUnavailableError,
    InvalidTransitionError,
    NotFoundError,
    SpoolError,
)
from storage.repository import InstanceRecord, ScoredInstance, VerdictInput

logger = logging.getLogger(__name__)

# Waiting this long after a database error keeps a down database from being hammered.
_ERROR_BACKOFF_SECONDS = 2.0


class DetectorLike(Protocol):
    @property
    def preprocess_config(self) -> Any: ...

    def score_prepared(self, images: Sequence[Any]) -> list[Any]: ...


def _decode_in_thread(jobs: Sequence[DecodeJob], limits: Any) -> list[SpoolDecoded | DecodeFailure]:
    """What ``DecodePool.decode`` gives, decoded in the calling thread (no decoding processes)."""
    return [decode_outcome(job.path, job.source, limits) for job in jobs]


def _prepare_decoded(decoded: Any, cfg: Any) -> Any:
    """The model's views of decoded frames (``detector.preprocess.prepare_decoded``)."""
    # imported here: it brings torch, which only the workers need
    from detector.preprocess import prepare_decoded

    return prepare_decoded(decoded, cfg)


class Pipeline:
    """``start()`` launches ``detector.workers`` threads; ``stop()`` lets each finish its batch."""

    def __init__(self, repo: Any, detector: DetectorLike, spool: Any, cfg: NodeConfig) -> None:
        self._repo = repo
        self._detector = detector
        self._spool = spool
        self._batch = cfg.detector.batch_size
        self._batch_wait = cfg.detector.batch_wait_ms / 1000.0
        self._workers = cfg.detector.workers
        self._poll = cfg.processing.poll_interval_seconds
        self._decode_processes = cfg.detector.decode_processes
        self._decode_timeout = cfg.detector.decode_timeout_seconds
        self._decode_pool: DecodePool | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._score_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        if self._decode_processes and self._decode_pool is None:
            self._decode_pool = DecodePool(self._decode_processes, timeout_seconds=self._decode_timeout)
            self._decode_pool.start()
        prefix = f"{os.uname().nodename}:{os.getpid()}"
        for i in range(self._workers):
            name = f"{prefix}:worker-{i}"
            t = threading.Thread(target=self._run, args=(name,), name=f"dski-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        logger.info(
            "pipeline started",
            extra={
                "workers": self._workers,
                "decode_processes": self._decode_processes,
                "batch_size": self._batch,
                "batch_wait_ms": round(self._batch_wait * 1000, 1),
            },
        )

    def wake(self) -> None:
        """Look at the queue now instead of at the next poll (e.g. after a store)."""
        self._wake.set()

    def stop(self, timeout: float | None = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        busy = False
        for t in self._threads:
            t.join(timeout)
            if t.is_alive():
                busy = True
                logger.warning("worker still busy at shutdown; its rows will be requeued", extra={"worker_thread": t.name})
        self._threads = []
        if self._decode_pool is not None:
            self._decode_pool.close(wait=not busy)  # a busy worker may be waiting on a hung decoding
            self._decode_pool = None
        logger.info("pipeline stopped")

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    # -- work --------------------------------------------------------------------

    def _run(self, worker: str) -> None:
        while not self._stop.is_set():
            # cleared before the claim, not after the wait: a store between the claim and the
            # wait leaves the event set, so it is picked up now instead of at the next poll
            self._wake.clear()
            try:
                done = self.run_once(worker)
            except DatabaseUnavailableError as exc:
                logger.error("database unavailable in worker", extra={"worker": worker, "error": str(exc)})
                self._stop.wait(_ERROR_BACKOFF_SECONDS)
                continue
            except Exception:  # a bug costs one batch (its rows get requeued), never the worker
                logger.exception("worker batch failed", extra={"worker": worker})
                self._stop.wait(_ERROR_BACKOFF_SECONDS)
                continue
            if done == 0:
                self._wake.wait(self._poll)

    def run_once(self, worker: str) -> int:
        """Claim and process one batch; returns the number of instances claimed."""
        records = self._claim_batch(worker)
        if not records:
            return 0
        prepared: list[tuple[InstanceRecord, Any]] = []
        headers: dict[int, bytes | None] = {}
        for record, image, header in self._prepare_batch(records):
            headers[record.id] = header
            prepared.append((record, image))
        if not prepared:
            return len(records)
        try:
            with self._score_lock:
                verdicts = self._detector.score_prepared([image for _, image in prepared])
        except Exception as exc:
            # the model itself failed (out of memory, a bad bundle): say so on every row
            logger.exception("detector failed on a batch", extra={"worker": worker, "size": len(prepared)})
            for record, _ in prepared:
                self._finish_failed(record, f"detector error: {type(exc).__name__}: {exc}")
            return len(records)
        # one transaction for the batch: a commit per instance cost more than the model
        errors = self._repo.record_verdicts(
            [
                ScoredInstance(record.id, VerdictInput.from_verdict(verdict), headers.get(record.id))
                for (record, _), verdict in zip(prepared, verdicts, strict=True)
            ],
            worker=worker,
        )
        for (record, _), verdict, error in zip(prepared, verdicts, errors, strict=True):
            if error is not None:
                # requeued as stuck and taken by another worker meanwhile: its verdict wins
                logger.warning("verdict not recorded", extra={"instance_id": record.id, "reason": str(error)})
                continue
            logger.info(
                "instance analysed",
                extra={
                    "instance_id": record.id,
                    "sop_instance_uid": record.sop_instance_uid,
                    "score": round(verdict.score, 4),
                    "label": verdict.label,
                    "elapsed_ms": round(verdict.elapsed_ms, 1),
                },
            )
        return len(records)

    def _claim_batch(self, worker: str) -> list[InstanceRecord]:
        """Up to ``batch_size`` received rows: a short claim is topped up for ``batch_wait_ms``."""
        records = list(self._repo.claim_received(worker, self._batch))
        if not records or len(records) >= self._batch or self._batch_wait <= 0:
            return records
        deadline = time.monotonic() + self._batch_wait
        while len(records) < self._batch and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # a store sets the event: claim at once instead of sleeping out the whole window
            if self._wake.wait(remaining):
                self._wake.clear()
            if self._stop.is_set():
                break
            try:
                records.extend(self._repo.claim_received(worker, self._batch - len(records)))
            except DatabaseUnavailableError as exc:
                # the rows already claimed are scored; the rest waits for the next batch
                logger.error("database unavailable while filling a batch", extra={"worker": worker, "error": str(exc)})
                break
        if len(records) < self._batch:
            logger.debug("partial batch", extra={"worker": worker, "size": len(records), "batch_size": self._batch})
        return records

    def _prepare_batch(self, records: Sequence[InstanceRecord]) -> list[tuple[InstanceRecord, Any, bytes | None]]:
        """Each record's prepared image and header (the file's bytes up to its Pixel Data, which
        the SR builder needs; kept in the database so that any node can build the report; None
        for deflated files). A record that cannot be prepared is marked failed with the reason
        and left out."""
        jobs: list[DecodeJob] = []
        waiting: list[InstanceRecord] = []
        for record in records:
            path = self._spool_path(record)
            if path is not None:
                jobs.append(DecodeJob(path, f"SOP {record.sop_instance_uid}"))
                waiting.append(record)
        cfg = self._detector.preprocess_config
        decode = self._decode_pool.decode if self._decode_pool is not None else _decode_in_thread
        out: list[tuple[InstanceRecord, Any, bytes | None]] = []
        for record, outcome in zip(waiting, decode(jobs, cfg.decode_limits()), strict=True):
            if isinstance(outcome, DecodeFailure):  # pydicom / decoders on broken data: never a score
                self._finish_failed(record, outcome.reason)
                continue
            try:
                out.append((record, _prepare_decoded(outcome.decoded, cfg), outcome.header))
            except Exception as exc:  # the model's views of odd frames: a defined failure
                self._finish_failed(record, failure_reason(exc))
        return out

    def _spool_path(self, record: InstanceRecord) -> str | None:
        """Where the record's spool file is; None (and the record failed) when nowhere."""
        if record.spool_path is None:
            self._finish_failed(record, "spool file already deleted")
            return None
        try:
            return str(self._spool.resolve(record.spool_path))
        except (SpoolError, OSError) as exc:
            self._finish_failed(record, f"cannot read spool file: {exc}")
        return None

    def _finish_failed(self, record: InstanceRecord, reason: str) -> None:
        try:
            self._repo.mark_failed(record.id, reason)
        except (InvalidTransitionError, NotFoundError) as exc:
            logger.warning("failure not recorded", extra={"instance_id": record.id, "reason": str(exc)})
            return
        logger.warning(
            "instance failed",
            extra={"instance_id": record.id, "sop_instance_uid": record.sop_instance_uid, "reason": reason},
        )
