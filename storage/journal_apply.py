"""Applying the receive journal: spool files and ``instances`` rows, in the background.

``JournaledStore`` is what the C-STORE handler uses when the journal is on
(``storage.journal``). ``store`` returns once the object and its future row are in the
journal, durable; its thread then writes the spool files of a batch (what queued within
50 ms, up to 64), makes them durable with one ``syncfs`` (``Spool.sync_filesystem``) and
commits their rows in one transaction (``Repository.record_received_batch``). Only then
is the records' journal space given back. Invariant: a committed row's spool file is
durable. Batching is what keeps this thread's flushes from slowing the journal's own
fdatasync on the C-STORE path: the disk serialises flushes.

Failures while applying never lose an acknowledged object:

- database unavailable, disk full, I/O error: the files written for the batch are
  removed again, the batch is retried with backoff, and ``refusal`` tells the handler
  to refuse new objects with out of resources (0xA700) until a batch commits again;
- an object that a batch cannot record for a reason of its own: the batch is retried
  one object at a time and that object's file goes to quarantine with the reason,
  its record given back, so one bad object cannot block the journal;
- a crash: ``recover`` applies the records of unfreed segments again at the next
  start. A record whose row exists (same SOP Instance UID and time of receipt) is
  skipped, so nothing is recorded twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from storage.errors import DatabaseUnavailableError, SpoolError
from storage.journal import JournalRecord, ReceiveJournal
from storage.repository import ReceivedObject, ReceiveResult, Repository
from storage.spool import Spool, planned_path

__all__ = ["JournalSettings", "JournaledStore", "decode_meta", "encode_meta"]

logger = logging.getLogger(__name__)

# the first retry after a failed batch, doubled up to the last
_RETRY_FIRST_SECONDS = 0.05
_RETRY_MAX_SECONDS = 2.0
_BATCH_MAX = 64
_IDLE_SECONDS = 0.5
_LINGER_SECONDS = 0.05  # measured: 1.06-1.19x receive throughput over 0.01 with one association


@dataclass(frozen=True)
class JournalSettings:
    directory: Path
    segment_bytes: int
    max_backlog_bytes: int
    quarantine_dir: Path


@dataclass(frozen=True)
class JournalEntry:
    """What a record's meta holds: the row to be, less what the applier computes from the bytes."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str | None
    modality: str | None
    transfer_syntax_uid: str
    calling_ae: str
    peer_address: str
    spool_path: str
    status: str
    reason: str | None
    received_at: str  # ISO 8601, UTC
    kind: str  # the classification, for the "stored instance" log line


def encode_meta(entry: JournalEntry) -> bytes:
    # vars(), not asdict(): the fields are flat strings, and asdict's deep copy is a third
    # of this function's time on the C-STORE path
    return json.dumps(vars(entry), separators=(",", ":")).encode("utf-8")


def decode_meta(meta: bytes) -> JournalEntry:
    return JournalEntry(**json.loads(meta))


@dataclass
class _Item:
    record: JournalRecord
    entry: JournalEntry
    received_at: datetime


def _item(record: JournalRecord) -> _Item:
    entry = decode_meta(record.meta)
    return _Item(record, entry, datetime.fromisoformat(entry.received_at))


class JournaledStore:
    """The journal of one receiver and the thread that applies it.

    ``open()`` applies what an earlier run left, then starts the thread; ``close()``
    applies what is queued (unless the database is down: it stays for the next start).
    """

    def __init__(
        self,
        settings: JournalSettings,
        spool: Spool,
        repo: Repository,
        *,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._spool = spool
        self._repo = repo
        self._on_stored = on_stored
        self._journal = ReceiveJournal(
            settings.directory, segment_bytes=settings.segment_bytes, on_durable=self._enqueue
        )
        self._cond = threading.Condition()
        self._queue: list[JournalRecord] = []
        self._stopping = False
        self._failure: str | None = None  # why the last batch failed, until one commits
        self._thread: threading.Thread | None = None

    # -- life cycle ----------------------------------------------------------------

    def open(self) -> int:
        """Apply the records an earlier run left (blocking), then start applying in the
        background. Returns how many records were found. Raises ``SpoolError`` when no
        segment can be written (e.g. a spool on a nearly full disk), after the records of
        earlier runs are applied; ``DatabaseUnavailableError`` when those cannot be."""
        records = self._journal.recover()
        if records:
            self._apply_recovered(self._usable(records))
        self._journal.start()
        self._thread = threading.Thread(target=self._run, name="journal-apply", daemon=True)
        self._thread.start()
        return len(records)

    def apply_leftovers(self) -> int:
        """Apply what an earlier run left and close, without serving (the node does this for
        every journal before its receivers start). Returns how many records were found."""
        records = self._journal.recover()
        try:
            if records:
                self._apply_recovered(self._usable(records))
        finally:
            self._journal.close()
        return len(records)

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("journal not applied before stop; the next start applies it",
                             extra={"journal": str(self.settings.directory), "queued": len(self._queue)})
        self._journal.close()

    def wait_applied(self, timeout: float) -> bool:
        """Wait until every journaled object is in the spool and the database (tests, and
        tools that read the database right after sending); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._journal.pending_bytes > 0:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    # -- the handler's side ----------------------------------------------------------

    def fits(self, size: int) -> bool:
        return self._journal.fits(size)

    def refusal(self, size: int) -> str | None:
        """Why a new object of ``size`` bytes must be refused now (out of resources), or None."""
        if self._failure is not None:
            return self._failure
        if self._journal.pending_bytes + size > self.settings.max_backlog_bytes:
            return "journal backlog full"
        return None

    def plan(self, size: int) -> Path:
        """The spool path for a new object (``Spool.plan``: ``SpoolFullError`` when no room)."""
        return self._spool.plan(size)

    def store(self, entry: JournalEntry, data: bytes) -> None:
        """Durable on return (``ReceiveJournal.append``); raises ``SpoolError`` when not."""
        self._journal.append(encode_meta(entry), data)

    def _enqueue(self, record: JournalRecord) -> None:
        # decoded in the applier's thread: the association's thread only queues
        with self._cond:
            self._queue.append(record)
            self._cond.notify()

    # -- the applier thread ----------------------------------------------------------

    def _run(self) -> None:
        # the spare segment is prepared when the thread is idle (below), never ahead of a
        # queued batch: zero-filling a segment takes tens of milliseconds
        while True:
            with self._cond:
                if not self._queue and not self._stopping:
                    self._cond.wait(_IDLE_SECONDS)
                if not self._queue:
                    if self._stopping:
                        return
                    idle = True
                    batch: list[JournalRecord] = []
                else:
                    idle = False
                    batch, self._queue = self._queue[:_BATCH_MAX], self._queue[_BATCH_MAX:]
            if idle:
                self._prepare_spare()
                continue
            if len(batch) < _BATCH_MAX:
                # let a few more arrive: a commit costs about the same for one row as for
                # ten, and this thread competes with the associations for the CPU
                time.sleep(_LINGER_SECONDS)
                with self._cond:
                    more = _BATCH_MAX - len(batch)
                    batch += self._queue[:more]
                    del self._queue[:more]
            try:
                if not self._apply_with_retry(self._usable(batch)):
                    return  # stopping while the batch cannot be applied: the journal keeps it
            except Exception:  # a bug: refuse new stores; the next start applies the batch
                self._failure = "journal applier failed"
                logger.exception("journal applier failed; stores are refused until the node restarts",
                                 extra={"records": len(batch)})
                return
            self._prepare_spare()  # after a roll used it: the next roll is then a rename

    def _prepare_spare(self) -> None:
        try:
            self._journal.prepare_spare()
        except OSError as exc:  # a roll then zero-fills on the C-STORE path instead
            logger.warning("cannot prepare a journal segment", extra={"error": str(exc)})

    def _apply_with_retry(self, batch: list[_Item]) -> bool:
        delay = _RETRY_FIRST_SECONDS
        while True:
            try:
                self._apply(batch)
            except (DatabaseUnavailableError, SpoolError) as exc:
                self._failure = "database unavailable" if isinstance(exc, DatabaseUnavailableError) else "spool write failed"
                logger.error("journal batch not applied, will retry",
                             extra={"records": len(batch), "reason": str(exc), "retry_seconds": delay})
                with self._cond:
                    if self._stopping:
                        return False
                    self._cond.wait(delay)
                delay = min(delay * 2, _RETRY_MAX_SECONDS)
                continue
            self._failure = None
            return True

    def _usable(self, records: Sequence[JournalRecord]) -> list[_Item]:
        """The records as items; one whose metadata cannot be read or names a path the spool
        did not plan (a damaged or tampered journal) is set aside whole in quarantine, so
        that it can neither block the journal nor be lost."""
        items = []
        for record in records:
            try:
                item = _item(record)
                if not planned_path(item.entry.spool_path):
                    raise ValueError(f"spool path {item.entry.spool_path!r} was not planned by the spool")
            except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
                self._set_aside(record, f"unreadable journal record: {exc}")
                continue
            items.append(item)
        return items

    def _set_aside(self, record: JournalRecord, reason: str) -> None:
        folder = self.settings.quarantine_dir / datetime.now(timezone.utc).strftime("%Y-%m-%d")
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"journal-{record.segment:016x}-{record.offset}.bin"
        target.write_bytes(record.meta + b"\n" + record.data)
        target.with_name(target.name + ".reason.json").write_text(
            json.dumps({"reason": reason, "journal": str(self.settings.directory), "meta_bytes": len(record.meta)}),
            encoding="utf-8",
        )
        logger.error("journal record set aside", extra={"path": str(target), "reason": reason})
        self._journal.applied(record)

    def _apply_recovered(self, items: list[_Item]) -> None:
        """Start-up: apply what an earlier run may not have; raises if it cannot (the node
        must not open its port on a journal it cannot empty)."""
        done = self._repo.recorded_receipts(
            (i.entry.sop_instance_uid, i.received_at, i.entry.spool_path) for i in items
        )
        todo = []
        for item in items:
            if item.entry.spool_path in done:
                self._journal.applied(item.record)
            else:
                todo.append(item)
        for start in range(0, len(todo), _BATCH_MAX):
            self._apply(todo[start:start + _BATCH_MAX])
        logger.warning("journal applied after restart",
                       extra={"journal": str(self.settings.directory), "records": len(items),
                              "already_recorded": len(items) - len(todo)})

    def _apply(self, batch: Sequence[_Item]) -> None:
        """Files, then rows, then the journal space: all or nothing for the batch, except
        objects that fail on their own, which go to quarantine."""
        objects: list[ReceivedObject] = []
        written: list[str] = []
        try:
            for item in batch:
                spool_entry = self._spool.write_planned(item.entry.spool_path, item.record.data)
                written.append(item.entry.spool_path)
                objects.append(_received_object(item, spool_entry.sha256, spool_entry.size))
            self._spool.sync_filesystem()
            results = self._record(batch, objects)
        except BaseException:
            for path in written:  # no row points at them; the retry writes them again
                self._discard(path)
            raise
        analysed = False
        for item, result in zip(batch, results):
            if result is None:
                continue  # quarantined by _record
            if result.duplicate:
                self._discard(item.entry.spool_path)
            elif item.entry.status == "received":
                analysed = True
            logger.info(
                "stored instance",
                extra={
                    "sop_instance_uid": item.entry.sop_instance_uid,
                    "series_instance_uid": item.entry.series_instance_uid,
                    "instance_id": result.instance_id,
                    "duplicate": result.duplicate,
                    "kind": item.entry.kind,
                    "calling_ae": item.entry.calling_ae,
                },
            )
        for item in batch:
            self._journal.applied(item.record)
        if analysed and self._on_stored is not None:
            try:
                self._on_stored()
            except Exception:  # committed: whatever a listener does, the rows stand
                logger.exception("on_stored callback failed")

    def _record(self, batch: Sequence[_Item], objects: list[ReceivedObject]) -> list[ReceiveResult | None]:
        try:
            return list(self._repo.record_received_batch(objects))
        except DatabaseUnavailableError:
            raise
        except Exception as exc:
            if len(objects) > 1:  # find the object that fails on its own
                out: list[ReceiveResult | None] = []
                for item, obj in zip(batch, objects):
                    out.extend(self._record([item], [obj]))
                return out
            self._quarantine(batch[0], exc)
            return [None]

    def _quarantine(self, item: _Item, exc: BaseException) -> None:
        reason = f"acknowledged but not recordable: {type(exc).__name__}: {exc}"
        logger.error("journaled object quarantined",
                     extra={"sop_instance_uid": item.entry.sop_instance_uid, "reason": reason})
        self._spool.quarantine(item.entry.spool_path, self.settings.quarantine_dir, reason[:500])

    def _discard(self, path: str) -> None:
        try:
            self._spool.delete(path)
        except Exception as exc:  # reconciliation quarantines what is left
            logger.error("cannot remove spool file", extra={"path": path, "error": str(exc)})


def _received_object(item: _Item, sha256: str, size: int) -> ReceivedObject:
    row = {k: v for k, v in vars(item.entry).items() if k not in ("received_at", "kind")}
    return ReceivedObject(**row, sha256=sha256, size_bytes=size, received_at=item.received_at)


def journal_entry(**fields: Any) -> JournalEntry:
    """A ``JournalEntry`` stamped with the current time (UTC) as its time of receipt."""
    return JournalEntry(received_at=datetime.now(timezone.utc).isoformat(), **fields)
