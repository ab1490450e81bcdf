"""Worker threads that score received instances.

The queue is the ``instances`` table: a worker claims up to ``detector.batch_size``
``received`` rows (they become ``analysing``), reads each spool file, prepares it
for the model, scores the batch and records one verdict per instance. An instance
whose pixel data cannot be used is marked ``failed`` with the reason: there is
never a silent score. Nothing is kept in memory between batches, so a crash loses
nothing: rows left in ``analysing`` are put back by ``requeue_in_progress``.

Preparation (reading, decoding, resizing) runs in every worker in parallel; the
forward pass is serialised with a lock because a ``Detector`` scores one call at a
time.

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

import io
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from pydicom import Dataset, dcmread
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from listener.config import NodeConfig
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


def _prepare(detector: DetectorLike, path: str, record: InstanceRecord) -> Any:
    """Read the spool file and prepare it; raises ``PreprocessError`` (or a read error)."""
    return _prepare_with_header(detector, path, record)[0]


def _prepare_with_header(detector: DetectorLike, path: str, record: InstanceRecord) -> tuple[Any, bytes | None]:
    """The prepared image and the file's bytes up to its Pixel Data (the header the SR builder
    needs, kept in the database so that any node can build the report; None for deflated files)."""
    from detector.preprocess import prepare_dataset

    with open(path, "rb") as fh:
        raw = fh.read()
    ds, header = read_with_header(raw)
    return prepare_dataset(ds, detector.preprocess_config, f"SOP {record.sop_instance_uid}"), header


def read_with_header(raw: bytes) -> tuple[Dataset, bytes | None]:
    """The whole data set of a DICOM file, and its bytes up to the Pixel Data (None for a
    deflated file, whose stream positions are not the file's), from one parse.

    The header is read first, up to the Pixel Data; the rest of the file is then read from
    there in the same encoding and added: the data set ``dcmread`` gives for the whole
    file, without a second parse of the header (which cost as much as the forward pass).
    """
    stream = io.BytesIO(raw)
    ds = dcmread(stream, stop_before_pixels=True)
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return dcmread(io.BytesIO(raw)), None
    header_end = stream.tell()
    is_implicit_vr, is_little_endian = ds.original_encoding
    ds.update(read_dataset(stream, is_implicit_vr, is_little_endian))
    return ds, raw[:header_end]


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
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._score_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    # -- life cycle ------------------------------------------------------------

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        prefix = f"{os.uname().nodename}:{os.getpid()}"
        for i in range(self._workers):
            name = f"{prefix}:worker-{i}"
            t = threading.Thread(target=self._run, args=(name,), name=f"dski-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        logger.info(
            "pipeline started",
            extra={"workers": self._workers, "batch_size": self._batch, "batch_wait_ms": round(self._batch_wait * 1000, 1)},
        )

    def wake(self) -> None:
        """Look at the queue now instead of at the next poll (e.g. after a store)."""
        self._wake.set()

    def stop(self, timeout: float | None = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
            if t.is_alive():
                logger.warning("worker still busy at shutdown; its rows will be requeued", extra={"worker_thread": t.name})
        self._threads = []
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
        for record in records:
            result = self._prepare_one(record)
            if result is not None:
                image, headers[record.id] = result
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

    def _prepare_one(self, record: InstanceRecord) -> tuple[Any, bytes | None] | None:
        from detector.errors import PreprocessError

        if record.spool_path is None:
            self._finish_failed(record, "spool file already deleted")
            return None
        try:
            path = str(self._spool.resolve(record.spool_path))
            return _prepare_with_header(self._detector, path, record)
        except PreprocessError as exc:
            self._finish_failed(record, exc.reason)
        except (SpoolError, OSError) as exc:
            self._finish_failed(record, f"cannot read spool file: {exc}")
        except Exception as exc:  # pydicom / decoders on broken data: a defined failure, not a score
            self._finish_failed(record, f"cannot prepare image: {type(exc).__name__}: {exc}")
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
