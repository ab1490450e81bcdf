"""The node's state machine over the log database.

Instance states: ``received -> analysing -> analysed | skipped | failed``.
Report states: ``pending -> sending -> sent | retrying -> (sending ...) | dead``;
``retry_report`` puts a dead or retrying report back to ``pending`` by hand.

Every public method is one transaction, and every state change writes one
``events`` row in that same transaction, so the history can never disagree with
the current state. Claims are exclusive across threads and processes: on SQLite
every write transaction is ``BEGIN IMMEDIATE`` and each row moves with a
conditional ``UPDATE ... WHERE status = ...`` whose row count is checked; on
PostgreSQL the candidates are selected ``FOR UPDATE SKIP LOCKED`` first.

Several nodes may share one PostgreSQL database, each with its own spool. A
``Repository`` made with ``node_id`` (the spool's ``Spool.node_id``) stamps it on
the instances it receives and the reports it creates, and only claims, requeues,
reconciles and deletes rows stamped with it (or with NULL: rows from before
scale-out). Series completion is not node-bound: the verdicts keep the source
header, so any node can build the SR of a series received by several nodes, and
``create_report`` is idempotent on the SR UID when two nodes build it at once.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, NoReturn, Protocol

from sqlalchemy import Integer, and_, bindparam, exists, func, insert, or_, select, true, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from storage.database import Database
from storage.errors import InvalidTransitionError, NotFoundError, SpoolError
from storage.models import (
    INSTANCE_STATUSES,
    REPORT_STATUSES,
    Event,
    Instance,
    Report,
    ReportInstance,
    Verdict,
    utcnow,
)
from storage.spool import Spool

__all__ = [
    "ErrorRecord",
    "InstanceRecord",
    "InvalidTransitionError",
    "NotFoundError",
    "ReceiveResult",
    "ReceivedObject",
    "ReconcileResult",
    "ReportGroup",
    "ReportRecord",
    "Repository",
    "ScoredInstance",
    "StatusSummary",
    "VerdictInput",
    "VerdictRecord",
]

logger = logging.getLogger(__name__)
# how often a store tries BEGIN IMMEDIATE again while another writer holds the SQLite lock
_WRITE_POLL_SECONDS = 0.0005

_CHUNK = 500  # ids per IN (...) list, well under SQLite's variable limit
_MAX_TEXT = 4000  # error texts are truncated to this many characters


# -- records -------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceRecord:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str | None
    modality: str | None
    transfer_syntax_uid: str
    calling_ae: str
    peer_address: str
    received_at: datetime
    status: str
    status_reason: str | None
    claimed_by: str | None
    claimed_at: datetime | None
    spool_path: str | None  # relative to the spool root; None once deleted
    sha256: str
    size_bytes: int
    attempts: int
    spool_deleted_at: datetime | None
    reported_at: datetime | None


class VerdictLike(Protocol):
    """Anything with the fields of ``detector.Verdict`` (duck-typed: storage does not import torch)."""

    score: float
    label: str
    threshold: float
    classifier_score: float
    retrieval_score: float | None
    frames_scored: int
    bundle_name: str
    bundle_version: str
    model_version: str
    elapsed_ms: float


@dataclass(frozen=True)
class VerdictInput:
    score: float
    label: str
    threshold: float
    classifier_score: float
    retrieval_score: float | None
    frames_scored: int
    bundle_name: str
    bundle_version: str
    model_version: str
    elapsed_ms: float

    @classmethod
    def from_verdict(cls, v: VerdictLike) -> "VerdictInput":
        return cls(**{f.name: getattr(v, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class VerdictRecord(VerdictInput):
    id: int = 0
    instance_id: int = 0
    created_at: datetime | None = None


@dataclass(frozen=True)
class ScoredInstance:
    """One instance's verdict, for ``Repository.record_verdicts``; ``source_header``: the
    object up to its Pixel Data, kept for the SR builder."""

    instance_id: int
    verdict: VerdictInput
    source_header: bytes | None = None


@dataclass(frozen=True)
class ReceiveResult:
    instance_id: int
    duplicate: bool


_NEW_INSTANCE_STATUSES = ("received", "skipped", "failed")


@dataclass(frozen=True)
class ReceivedObject:
    """What ``Repository.record_received`` records for one object already in the spool."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str | None
    modality: str | None
    transfer_syntax_uid: str
    calling_ae: str
    peer_address: str
    spool_path: str | Path
    sha256: str
    size_bytes: int
    status: str = "received"
    reason: str | None = None
    received_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.status not in _NEW_INSTANCE_STATUSES:
            raise ValueError(f"status={self.status!r}: a new instance is 'received', 'skipped' or 'failed'")
        if not self.sop_instance_uid:
            raise ValueError("sop_instance_uid is empty")


@dataclass(frozen=True)
class ReportGroup:
    """Analysed instances ready for one SR: a series (``series_instance_uid`` set) or a whole study (None)."""

    study_instance_uid: str
    series_instance_uid: str | None
    instance_ids: tuple[int, ...]
    newest_received_at: datetime
    previous_report_id: int | None  # newest earlier report of the same group, if any

    @property
    def scope(self) -> Literal["series", "study"]:
        return "study" if self.series_instance_uid is None else "series"


@dataclass(frozen=True)
class ReportRecord:
    id: int
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    source_series_instance_uid: str | None
    destination: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None
    claimed_at: datetime | None
    path: str
    instance_count: int
    suspected_count: int
    max_score: float | None
    instance_ids: tuple[int, ...]


@dataclass(frozen=True)
class ErrorRecord:
    entity: str  # "instance" | "report"
    entity_id: int
    at: datetime
    status: str
    message: str


@dataclass(frozen=True)
class StatusSummary:
    instances: dict[str, int]  # every status present, zeros included
    reports: dict[str, int]
    oldest_pending_received_at: datetime | None  # oldest received/analysing instance
    recent_errors: list[ErrorRecord]  # newest first, at most 10


@dataclass(frozen=True)
class ReconcileResult:
    checked_files: int
    quarantined: list[tuple[str, Path]]  # (relative spool path, where it went)
    missing: list[int]  # instance ids marked failed because their file is gone
    temp_files_removed: int


# -- helpers -------------------------------------------------------------------


def aware_utc(value: datetime, name: str) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name}={value.isoformat()} is naive: pass a timezone-aware (UTC) datetime")
    return value.astimezone(timezone.utc)


def _chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


def instance_record(row: Instance) -> InstanceRecord:
    return InstanceRecord(**{f.name: getattr(row, f.name) for f in fields(InstanceRecord)})


_INSTANCE_RECORD_COLUMNS = tuple(getattr(Instance, f.name) for f in fields(InstanceRecord))
"""``Instance``'s columns in ``InstanceRecord``'s field order: a Core row of them is the record's arguments."""


def verdict_record(row: Verdict) -> VerdictRecord:
    return VerdictRecord(**{f.name: getattr(row, f.name) for f in fields(VerdictRecord)})


def _truncate(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


@dataclass(frozen=True)
class _ReceiveStatements:
    """The statements of ``record_received_batch_reference`` (the SQLAlchemy Core path), built
    once per repository: executed with a parameter dict, their compiled form comes from
    SQLAlchemy's cache instead of being rebuilt for every object."""

    insert_instance: Any  # INSERT ... ON CONFLICT (sop_instance_uid, sha256) DO NOTHING RETURNING id
    find_instance: Any  # SELECT id, status of the row an object duplicates
    insert_events: Any

    @classmethod
    def for_dialect(cls, dialect: str) -> _ReceiveStatements:
        if dialect == "sqlite":
            insert_ignoring = sqlite_insert
        elif dialect == "postgresql":
            insert_ignoring = postgresql_insert
        else:
            raise NotImplementedError(f"record_received: no INSERT ... ON CONFLICT for the {dialect} dialect")
        return cls(
            insert_instance=insert_ignoring(Instance)
            .on_conflict_do_nothing(index_elements=["sop_instance_uid", "sha256"])
            .returning(Instance.id),
            find_instance=select(Instance.id, Instance.status).where(
                Instance.sop_instance_uid == bindparam("uid"), Instance.sha256 == bindparam("sha")
            ),
            insert_events=insert(Event),
        )


# The parameters of the receive statements, in the order the fast path passes them.
_INSTANCE_KEYS: tuple[str, ...] = (
    "sop_instance_uid", "sop_class_uid", "study_instance_uid", "series_instance_uid", "patient_id", "modality",
    "transfer_syntax_uid", "calling_ae", "peer_address", "received_at", "status", "status_reason", "spool_path",
    "sha256", "size_bytes", "attempts", "node_id",
)
_FIND_KEYS: tuple[str, ...] = ("uid", "sha")
_EVENT_KEYS: tuple[str, ...] = ("at", "entity", "entity_id", "from_status", "to_status", "detail")


@dataclass(frozen=True)
class _DriverStatement:
    """One statement compiled by SQLAlchemy for a dialect, executed on the driver's cursor.

    ``sql`` is SQLAlchemy's own rendering (casts, quoting, paramstyle), and the values
    go through the column types' own bind processors (e.g. ``UTCDateTime``), so the
    driver receives exactly what SQLAlchemy would send; what is skipped is the
    per-call execution machinery, about half a millisecond of CPU per received object.
    """

    sql: str
    order: tuple[str, ...] | None  # positional paramstyles: the keys in placeholder order; None: named
    processors: tuple[tuple[str, Callable[[Any], Any]], ...]  # (key, bind processor) where the type has one

    @classmethod
    def compile(cls, stmt: Any, dialect: Any, keys: Sequence[str]) -> _DriverStatement:
        compiled = stmt.compile(dialect=dialect, column_keys=list(keys))
        binds = compiled.binds
        if set(binds) != set(keys) or compiled.escaped_bind_names:
            raise NotImplementedError(f"unexpected bind parameters {sorted(binds)} for {sorted(keys)}")
        processors = []
        for key in keys:
            processor = binds[key].type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                processors.append((key, processor))
        order = tuple(compiled.positiontup) if compiled.positional else None
        return cls(sql=compiled.string, order=order, processors=tuple(processors))

    def params(self, values: dict[str, Any]) -> Sequence[Any] | dict[str, Any]:
        """The driver's parameters for ``values`` (a dict holding every key; consumed)."""
        for key, processor in self.processors:
            values[key] = processor(values[key])
        if self.order is None:
            return values
        return [values[key] for key in self.order]


@dataclass(frozen=True)
class _DriverReceiveStatements:
    """The statements of ``record_received_batch`` compiled once for the database's dialect."""

    begin: str | None  # SQLite: the write lock up front (as Database's begin hook); PostgreSQL: implicit
    insert_instance: _DriverStatement
    find_instance: _DriverStatement
    insert_events: _DriverStatement

    @classmethod
    def for_database(cls, db: Database) -> _DriverReceiveStatements:
        dialect = db.engine.dialect
        core = _ReceiveStatements.for_dialect(db.dialect)
        return cls(
            begin="BEGIN IMMEDIATE" if db.is_sqlite else None,
            insert_instance=_DriverStatement.compile(core.insert_instance, dialect, _INSTANCE_KEYS),
            find_instance=_DriverStatement.compile(core.find_instance, dialect, _FIND_KEYS),
            insert_events=_DriverStatement.compile(core.insert_events, dialect, _EVENT_KEYS),
        )


@dataclass(frozen=True)
class _ClaimStatements:
    """The statements of ``claim_received``, built once per repository. On SQLite, for a batch
    of 8, building them on every claim took about 0.8 ms and the ORM objects for the rows
    and their events most of the rest of 6 ms, against about 1.1 ms of database work."""

    candidates: Any  # the oldest received ids of this node, up to :limit (PostgreSQL: SKIP LOCKED)
    move: Any  # UPDATE ... WHERE id IN :ids AND still received ... RETURNING the record's columns
    insert_events: Any

    @classmethod
    def build(cls, postgresql: bool, mine: Any, node_id: str | None) -> _ClaimStatements:
        candidates = (
            select(Instance.id)
            .where(Instance.status == "received", mine)
            .order_by(Instance.received_at, Instance.id)
            .limit(bindparam("limit", type_=Integer))
        )
        if postgresql:
            candidates = candidates.with_for_update(skip_locked=True)
        move = (
            update(Instance)
            .where(Instance.id.in_(bindparam("ids", expanding=True)), Instance.status == "received")
            .values(
                status="analysing",
                claimed_by=bindparam("worker", type_=Instance.claimed_by.type),
                claimed_at=bindparam("now", type_=Instance.claimed_at.type),
                attempts=Instance.attempts + 1,
                status_reason=None,
                # a row from before scale-out (no node id) becomes this node's when claimed,
                # so that no other node's start-up requeues it while it is being scored
                node_id=func.coalesce(Instance.node_id, node_id),
            )
            .returning(*_INSTANCE_RECORD_COLUMNS)
        )
        return cls(candidates, move, insert(Event))


@dataclass(frozen=True)
class _VerdictStatements:
    """The statements of ``record_verdicts``, built once per repository (as ``_ClaimStatements``)."""

    instances: Any  # id, status and claimer of the rows :ids (PostgreSQL: locked, in id order)
    judged: Any  # which of :ids already have a verdict
    insert_verdicts: Any
    finish: Any  # :ids -> analysed
    insert_events: Any

    @classmethod
    def build(cls, postgresql: bool) -> _VerdictStatements:
        ids = bindparam("ids", expanding=True)
        instances = (
            select(Instance.id, Instance.status, Instance.claimed_by)
            .where(Instance.id.in_(ids))
            .order_by(Instance.id)
        )
        if postgresql:
            instances = instances.with_for_update()
        return cls(
            instances=instances,
            judged=select(Verdict.instance_id).where(Verdict.instance_id.in_(ids)),
            insert_verdicts=insert(Verdict),
            finish=update(Instance)
            .where(Instance.id.in_(ids), Instance.status == "analysing")
            .values(status="analysed", status_reason=None),
            insert_events=insert(Event),
        )


def _event_row(
    entity_id: int, from_status: str | None, to_status: str | None, now: datetime, **detail: Any
) -> dict[str, Any]:
    """An ``events`` row of an instance as Core parameters (same encoding as ``Repository._event``)."""
    return {
        "at": now,
        "entity": "instance",
        "entity_id": entity_id,
        "from_status": from_status,
        "to_status": to_status,
        "detail": json.dumps(detail, sort_keys=True, default=str) if detail else None,
    }


class Repository:
    """All reads and writes of the node's state. Thread-safe: each call opens its own session."""

    def __init__(
        self, db: Database, *, clock: Callable[[], datetime] = utcnow, node_id: str | None = None
    ) -> None:
        self.db = db
        self._clock = clock
        self.node_id = node_id
        self._receive_statements: _ReceiveStatements | None = None  # built on first use
        self._driver_statements: _DriverReceiveStatements | None = None  # built on first use
        self._claim_statements: _ClaimStatements | None = None  # built on first use
        self._verdict_statements: _VerdictStatements | None = None  # built on first use

    def _mine(self, column: Any) -> Any:
        """Rows this node serves: stamped with its id, or unstamped; every row without a node id."""
        if self.node_id is None:
            return true()
        return or_(column == self.node_id, column.is_(None))

    def _now(self) -> datetime:
        return aware_utc(self._clock(), "clock()")

    def _event(
        self,
        s: Session,
        entity: str,
        entity_id: int | None,
        from_status: str | None,
        to_status: str | None,
        now: datetime,
        **detail: Any,
    ) -> None:
        s.add(
            Event(
                at=now,
                entity=entity,
                entity_id=entity_id,
                from_status=from_status,
                to_status=to_status,
                detail=json.dumps(detail, sort_keys=True, default=str) if detail else None,
            )
        )

    # -- instances -------------------------------------------------------------

    def record_received(
        self,
        *,
        sop_instance_uid: str,
        sop_class_uid: str,
        study_instance_uid: str,
        series_instance_uid: str,
        patient_id: str | None,
        modality: str | None,
        transfer_syntax_uid: str,
        calling_ae: str,
        peer_address: str,
        spool_path: str | Path,
        sha256: str,
        size_bytes: int,
        status: str = "received",
        reason: str | None = None,
        received_at: datetime | None = None,
        skip_reason: str | None = None,
    ) -> ReceiveResult:
        """Record an object whose bytes are already in the spool; commit before answering the sender.

        The same SOP Instance UID with the same sha256 is a duplicate: no row, an
        event on the existing row, ``duplicate=True`` (the caller deletes its new
        spool file). Other bytes under the same UID are a new row.
        ``skip_reason`` is shorthand for ``status="skipped", reason=skip_reason``
        (objects the node keeps but does not analyse, e.g. non-image classes).
        """
        if skip_reason is not None:
            if status not in ("received", "skipped"):
                raise ValueError(f"skip_reason given with status={status!r}")
            status, reason = "skipped", skip_reason
        obj = ReceivedObject(
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            patient_id=patient_id,
            modality=modality,
            transfer_syntax_uid=transfer_syntax_uid,
            calling_ae=calling_ae,
            peer_address=peer_address,
            spool_path=spool_path,
            sha256=sha256,
            size_bytes=size_bytes,
            status=status,
            reason=reason,
            received_at=received_at,
        )
        return self.record_received_batch([obj])[0]

    def record_received_batch(self, objects: Sequence[ReceivedObject]) -> list[ReceiveResult]:
        """``record_received`` for several objects in ONE transaction, results in the same order.

        The listener's group commit uses it: concurrent associations share one commit
        (one WAL fsync) instead of queueing for one each. All or nothing: when the
        commit fails no object is recorded and the exception reaches every caller.
        Duplicates are detected as in ``record_received``, also between objects of
        the same batch.

        Runs the statements SQLAlchemy compiled for this dialect on the driver's cursor
        (see ``_DriverStatement``): the same SQL, values and transaction as
        ``record_received_batch_reference``, at a third of its CPU. Driver errors are
        translated as SQLAlchemy translates them, so an unreachable or locked database
        is ``DatabaseUnavailableError`` as everywhere else.
        """
        if not objects:
            return []
        now = self._now()
        # the values first: a bad object (naive received_at) fails before the database is touched
        rows = [self._instance_values(obj, now) for obj in objects]
        if self._driver_statements is None:
            self._driver_statements = _DriverReceiveStatements.for_database(self.db)
        stmts = self._driver_statements
        dialect = self.db.engine.dialect
        dbapi_error = dialect.loaded_dbapi.Error
        with self.db._guard():  # noqa: SLF001 - the one mapping of driver failures to DatabaseUnavailableError
            try:
                raw = self.db.engine.raw_connection()  # from the pool: pre-ping and reset-on-return apply
            except dbapi_error as exc:  # cannot connect: as Engine.connect() raises it
                raise DBAPIError.instance(None, None, exc, dbapi_error, dialect=dialect) from exc  # type: ignore[arg-type]
            try:
                cursor = raw.cursor()
                sql, params = stmts.begin, None
                try:
                    if stmts.begin is not None:
                        self._begin_sqlite_write(cursor, stmts.begin)
                    results: list[ReceiveResult] = []
                    events: list[Any] = []
                    for obj, values in zip(objects, rows):
                        path = values["spool_path"]  # before params() hands the dict to the bind processors
                        sql, params = stmts.insert_instance.sql, stmts.insert_instance.params(values)
                        cursor.execute(sql, params)
                        row = cursor.fetchone()
                        if row is not None:
                            results.append(ReceiveResult(row[0], False))
                            event = _event_row(
                                row[0], None, obj.status, now,
                                event="received", calling_ae=obj.calling_ae, peer_address=obj.peer_address,
                                sop_instance_uid=obj.sop_instance_uid, reason=obj.reason,
                            )
                        else:
                            # the row this object duplicates: committed earlier, or inserted
                            # just before in this batch (visible in the same transaction)
                            find = stmts.find_instance
                            sql, params = find.sql, find.params({"uid": obj.sop_instance_uid, "sha": obj.sha256})
                            cursor.execute(sql, params)
                            found = cursor.fetchone()
                            if found is None:  # pragma: no cover - the conflict that skipped the insert names this row
                                raise RuntimeError(f"insert of {obj.sop_instance_uid} skipped but no row holds it")
                            results.append(ReceiveResult(found[0], True))
                            event = _event_row(
                                found[0], found[1], found[1], now,
                                event="duplicate received", calling_ae=obj.calling_ae,
                                peer_address=obj.peer_address, spool_path=path,
                            )
                        events.append(stmts.insert_events.params(event))
                    sql, params = stmts.insert_events.sql, events
                    cursor.executemany(sql, events)
                    sql, params = "COMMIT", None
                    raw.commit()
                except dbapi_error as exc:
                    self._driver_failure(raw, cursor, exc, sql, params)
                finally:
                    cursor.close()
            finally:
                raw.close()  # back to the pool, which rolls back whatever was not committed
        return results

    def _begin_sqlite_write(self, cursor: Any, begin: str) -> None:
        """``begin`` (BEGIN IMMEDIATE), tried again every ``_WRITE_POLL_SECONDS`` while another
        writer holds the lock, up to the database's busy timeout.

        SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between tries, so a
        store that met the scorer's transactions waited for the next step of that schedule,
        not for the transactions: p99 C-STORE response times of about 63 ms, the sum of its
        first six steps plus a store, while the node scored (docs/performance.md, Receive).
        A try costs a few microseconds, spent only while another writer holds the lock."""
        cursor.execute("PRAGMA busy_timeout=0")
        try:
            deadline = time.monotonic() + self.db.busy_timeout_ms / 1000
            while True:
                try:
                    cursor.execute(begin)
                    return
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                        raise
                time.sleep(_WRITE_POLL_SECONDS)
        finally:
            cursor.execute(f"PRAGMA busy_timeout={int(self.db.busy_timeout_ms)}")

    def _driver_failure(self, raw: Any, cursor: Any, exc: BaseException, sql: str | None, params: Any) -> NoReturn:
        """Raise a driver error as the SQLAlchemy exception ``Connection.execute`` would raise,
        dropping the connection from the pool when the error says it is dead."""
        dialect = self.db.engine.dialect
        invalidated = False
        try:
            invalidated = bool(dialect.is_disconnect(exc, raw.dbapi_connection, cursor))
        except Exception:  # noqa: BLE001 - deciding about the connection must not hide the error
            logger.debug("cannot tell whether the connection is dead", exc_info=True)
        if invalidated:
            raw.invalidate(exc)
        raise DBAPIError.instance(
            sql or "", params, exc, dialect.loaded_dbapi.Error,
            connection_invalidated=invalidated, dialect=dialect,
        ) from exc  # type: ignore[arg-type]

    def _instance_values(self, obj: ReceivedObject, now: datetime) -> dict[str, Any]:
        """The ``instances`` row of ``obj`` as statement values (keys ``_INSTANCE_KEYS``)."""
        return {
            "sop_instance_uid": obj.sop_instance_uid,
            "sop_class_uid": obj.sop_class_uid,
            "study_instance_uid": obj.study_instance_uid,
            "series_instance_uid": obj.series_instance_uid,
            "patient_id": obj.patient_id,
            "modality": obj.modality,
            "transfer_syntax_uid": obj.transfer_syntax_uid,
            "calling_ae": obj.calling_ae,
            "peer_address": obj.peer_address,
            "received_at": now if obj.received_at is None else aware_utc(obj.received_at, "received_at"),
            "status": obj.status,
            "status_reason": obj.reason,
            "spool_path": Path(obj.spool_path).as_posix(),
            "sha256": obj.sha256,
            "size_bytes": obj.size_bytes,
            "attempts": 0,
            "node_id": self.node_id,
        }

    def record_received_batch_reference(self, objects: Sequence[ReceivedObject]) -> list[ReceiveResult]:
        """``record_received_batch`` through a SQLAlchemy session and Core statements: the
        implementation before the driver-level one, kept as its reference in the tests and
        in ``benchmarks/store_path.py``. Same rows, events, results and errors."""
        if not objects:
            return []
        now = self._now()
        if self._receive_statements is None:
            self._receive_statements = _ReceiveStatements.for_dialect(self.db.dialect)
        stmts = self._receive_statements
        with self.db.session() as s:
            conn = s.connection()
            results: list[ReceiveResult] = []
            events: list[dict[str, Any]] = []
            for obj in objects:
                result, event = self._insert_received(conn, stmts, obj, now)
                results.append(result)
                events.append(event)
            conn.execute(stmts.insert_events, events)
        return results

    def _insert_received(
        self, conn: Connection, stmts: _ReceiveStatements, obj: ReceivedObject, now: datetime
    ) -> tuple[ReceiveResult, dict[str, Any]]:
        """Insert one instance row, or find the row it duplicates; returns the result and its event row.

        One ``INSERT ... ON CONFLICT (sop_instance_uid, sha256) DO NOTHING RETURNING id``
        instead of a SELECT then INSERT: one statement in the common case, and on
        PostgreSQL a concurrent insert of the same object waits for the other
        transaction instead of failing, so no retry path is needed.
        """
        values = self._instance_values(obj, now)
        path = values["spool_path"]
        new_id = conn.execute(
            stmts.insert_instance,
            values,
        ).scalar()
        if new_id is not None:
            event = _event_row(
                new_id, None, obj.status, now,
                event="received", calling_ae=obj.calling_ae, peer_address=obj.peer_address,
                sop_instance_uid=obj.sop_instance_uid, reason=obj.reason,
            )
            return ReceiveResult(new_id, False), event
        row = conn.execute(stmts.find_instance, {"uid": obj.sop_instance_uid, "sha": obj.sha256}).first()
        if row is None:  # pragma: no cover - the conflict that skipped the insert names this row
            raise RuntimeError(f"insert of {obj.sop_instance_uid} skipped but no row holds it")
        event = _event_row(
            row.id, row.status, row.status, now,
            event="duplicate received", calling_ae=obj.calling_ae, peer_address=obj.peer_address, spool_path=path,
        )
        return ReceiveResult(row.id, True), event

    def claim_received(self, worker: str, limit: int) -> list[InstanceRecord]:
        """Move up to ``limit`` received instances (oldest first) to analysing for ``worker``."""
        if limit <= 0:
            return []
        now = self._now()
        if self._claim_statements is None:
            self._claim_statements = _ClaimStatements.build(self.db.is_postgresql, self._mine(Instance.node_id),
                                                            self.node_id)
        stmts = self._claim_statements
        with self.db.session() as s:
            conn = s.connection()
            candidates = conn.execute(stmts.candidates, {"limit": limit}).scalars().all()
            if not candidates:
                return []
            # RETURNING gives the rows as moved; the status test skips a row another worker
            # took between the select and this update
            moved = conn.execute(stmts.move, {"ids": candidates, "worker": worker, "now": now}).all()
            if not moved:
                return []
            position = {instance_id: n for n, instance_id in enumerate(candidates)}
            moved.sort(key=lambda row: position[row.id])  # oldest first, as selected
            conn.execute(stmts.insert_events, [
                _event_row(row.id, "received", "analysing", now, worker=worker) for row in moved
            ])
            return [InstanceRecord(*row) for row in moved]

    def _transition(
        self, s: Session, instance_id: int, allowed: tuple[str, ...], to_status: str
    ) -> Instance:
        query = select(Instance).where(Instance.id == instance_id)
        if self.db.is_postgresql:
            query = query.with_for_update()
        row = s.scalars(query).first()
        if row is None:
            raise NotFoundError("instance", instance_id)
        if row.status not in allowed:
            raise InvalidTransitionError("instance", instance_id, row.status, to_status)
        return row

    def record_verdict(
        self,
        instance_id: int,
        v: VerdictInput | VerdictLike,
        *,
        worker: str | None = None,
        source_header: bytes | None = None,
    ) -> None:
        """Store the verdict of an instance being analysed and move it to analysed.

        With ``worker``, the instance must still be claimed by that worker (it may
        have been requeued as stuck and claimed by another one meanwhile).
        ``source_header``: the object up to its Pixel Data, kept for the SR builder.
        """
        data = v if isinstance(v, VerdictInput) else VerdictInput.from_verdict(v)
        error = self.record_verdicts([ScoredInstance(instance_id, data, source_header)], worker=worker)[0]
        if error is not None:
            raise error

    def record_verdicts(
        self, items: Sequence[ScoredInstance], *, worker: str | None = None
    ) -> list[NotFoundError | InvalidTransitionError | None]:
        """``record_verdict`` for a batch in one transaction: one commit (one flush of the
        database) for a worker's whole batch instead of one per instance.

        An instance that cannot take its verdict (gone, no longer analysing, claimed by
        another worker, already judged) does not hold up the others: its error is returned
        in its place, None where the verdict was recorded.
        """
        if not items:
            return []
        now = self._now()
        if self._verdict_statements is None:
            self._verdict_statements = _VerdictStatements.build(self.db.is_postgresql)
        stmts = self._verdict_statements
        outcomes: list[NotFoundError | InvalidTransitionError | None] = []
        ids = sorted({item.instance_id for item in items})
        with self.db.session() as s:
            conn = s.connection()
            # the status is updated here as the batch is recorded: as if its verdicts were
            # recorded one after the other
            status: dict[int, str] = {}
            claimer: dict[int, str | None] = {}
            judged: set[int] = set()
            for chunk in _chunks(ids):
                # locked in id order on PostgreSQL, so that two workers never wait on each other in a cycle
                for row in conn.execute(stmts.instances, {"ids": chunk}):
                    status[row.id], claimer[row.id] = row.status, row.claimed_by
                judged.update(conn.execute(stmts.judged, {"ids": chunk}).scalars())
            verdicts: list[dict[str, Any]] = []
            events: list[dict[str, Any]] = []
            for item in items:
                instance_id, data = item.instance_id, item.verdict
                current = status.get(instance_id)
                error: NotFoundError | InvalidTransitionError | None = None
                if current is None:
                    error = NotFoundError("instance", instance_id)
                elif current != "analysing":
                    error = InvalidTransitionError("instance", instance_id, current, "analysed")
                elif worker is not None and claimer[instance_id] != worker:
                    error = InvalidTransitionError(
                        "instance", instance_id, f"analysing by {claimer[instance_id]}", "analysed")
                elif instance_id in judged:
                    error = InvalidTransitionError("instance", instance_id, "analysing (verdict exists)", "analysed")
                outcomes.append(error)
                if error is not None:
                    continue
                judged.add(instance_id)
                status[instance_id] = "analysed"
                verdicts.append({
                    "instance_id": instance_id,
                    "created_at": now,
                    "source_header": item.source_header,
                    **{f.name: getattr(data, f.name) for f in fields(VerdictInput)},
                })
                events.append(_event_row(
                    instance_id, "analysing", "analysed", now,
                    score=data.score, label=data.label, model_version=data.model_version, worker=claimer[instance_id],
                ))
            if verdicts:
                # Core statements, not ORM objects: a flush of a Verdict, an Instance update and
                # an Event per row cost several times the database's own work
                conn.execute(stmts.insert_verdicts, verdicts)
                for chunk in _chunks([v["instance_id"] for v in verdicts]):
                    conn.execute(stmts.finish, {"ids": chunk})
                conn.execute(stmts.insert_events, events)
        return outcomes

    def mark_failed(self, instance_id: int, reason: str) -> None:
        self._finish(instance_id, "failed", reason)

    def mark_skipped(self, instance_id: int, reason: str) -> None:
        self._finish(instance_id, "skipped", reason)

    def _finish(self, instance_id: int, to_status: str, reason: str) -> None:
        now = self._now()
        with self.db.session() as s:
            row = self._transition(s, instance_id, ("received", "analysing"), to_status)
            from_status = row.status
            row.status = to_status
            row.status_reason = _truncate(reason)
            self._event(s, "instance", instance_id, from_status, to_status, now, reason=row.status_reason)

    def requeue_in_progress(
        self, older_than: timedelta | None = None, *, max_attempts: int | None = None
    ) -> int:
        """Put stuck work back in the queue: analysing -> received, sending -> pending.

        ``older_than=None`` takes everything (start-up, when no worker can be
        running); otherwise only claims older than that. With ``max_attempts``, an
        instance already claimed that many times goes to failed instead: an object
        that kills its worker every time must not loop forever.
        Returns the number of instances and reports changed.
        """
        now = self._now()
        cutoff = None if older_than is None else now - older_than
        changed = 0
        with self.db.session() as s:
            q = select(Instance).where(Instance.status == "analysing", self._mine(Instance.node_id))
            if cutoff is not None:
                q = q.where(or_(Instance.claimed_at.is_(None), Instance.claimed_at <= cutoff))
            if self.db.is_postgresql:
                q = q.with_for_update(skip_locked=True)
            for row in s.scalars(q).all():
                worker = row.claimed_by
                if max_attempts is not None and row.attempts >= max_attempts:
                    row.status = "failed"
                    row.status_reason = f"gave up after {row.attempts} attempts: analysis never finished"
                    self._event(s, "instance", row.id, "analysing", "failed", now, reason=row.status_reason, worker=worker)
                else:
                    row.status = "received"
                    row.claimed_by = None
                    row.claimed_at = None
                    self._event(s, "instance", row.id, "analysing", "received", now, event="requeued", worker=worker)
                changed += 1
            rq = select(Report).where(Report.status == "sending", self._mine(Report.node_id))
            if cutoff is not None:
                rq = rq.where(or_(Report.claimed_at.is_(None), Report.claimed_at <= cutoff))
            if self.db.is_postgresql:
                rq = rq.with_for_update(skip_locked=True)
            for rep in s.scalars(rq).all():
                rep.status = "pending"
                rep.next_attempt_at = now
                rep.claimed_at = None
                self._event(s, "report", rep.id, "sending", "pending", now, event="requeued")
                changed += 1
        if changed:
            logger.warning("requeued stuck work", extra={"count": changed})
        return changed

    # -- report groups -----------------------------------------------------------

    def ready_groups(
        self, idle_seconds: float, scope: Literal["series", "study"] = "series", now: datetime | None = None
    ) -> list[ReportGroup]:
        """Groups whose SR can be built now, oldest first.

        A group (a series, or a study for ``scope="study"``) is ready when its newest
        instance arrived at least ``idle_seconds`` ago, none of its instances is
        received or analysing, and its analysed instances differ from those of its
        newest report (a re-sent identical series gives nothing; new images do).
        Of several rows with one SOP Instance UID only the newest counts: a changed
        object replaces the old one in the next report.
        """
        if scope not in ("series", "study"):
            raise ValueError(f"scope={scope!r}: expected 'series' or 'study'")
        now = self._now() if now is None else aware_utc(now, "now")
        cutoff = now - timedelta(seconds=idle_seconds)
        by_series = scope == "series"
        groups: list[ReportGroup] = []
        with self.db.read_session() as s:
            key_cols = [Instance.study_instance_uid] + ([Instance.series_instance_uid] if by_series else [])
            # served by the partial index ix_instances_unreported: only analysed rows never reported
            candidates = s.execute(
                select(*key_cols)
                .where(Instance.status == "analysed", Instance.reported_at.is_(None))
                .distinct()
            ).all()
            for key in candidates:
                study = key[0]
                series = key[1] if by_series else None
                where = [Instance.study_instance_uid == study]
                if by_series:
                    where.append(Instance.series_instance_uid == series)
                rows = s.execute(
                    select(Instance.id, Instance.sop_instance_uid, Instance.status, Instance.received_at)
                    .where(*where)
                    .order_by(Instance.id)
                ).all()
                if any(r.status in ("received", "analysing") for r in rows):
                    continue
                newest_at = max(r.received_at for r in rows)
                if newest_at > cutoff:
                    continue
                newest_per_sop: dict[str, Any] = {}
                for r in rows:  # ascending id: the last one wins
                    newest_per_sop[r.sop_instance_uid] = r
                ids = tuple(sorted(r.id for r in newest_per_sop.values() if r.status == "analysed"))
                if not ids:
                    continue
                series_cond = (
                    Report.source_series_instance_uid == series
                    if by_series
                    else Report.source_series_instance_uid.is_(None)
                )
                previous = s.scalar(
                    select(Report.id)
                    .where(Report.study_instance_uid == study, series_cond)
                    .order_by(Report.created_at.desc(), Report.id.desc())
                    .limit(1)
                )
                if previous is not None:
                    previous_ids = set(
                        s.scalars(select(ReportInstance.instance_id).where(ReportInstance.report_id == previous))
                    )
                    if previous_ids == set(ids):
                        continue
                groups.append(ReportGroup(study, series, ids, newest_at, previous))
        groups.sort(key=lambda g: (g.newest_received_at, g.study_instance_uid, g.series_instance_uid or ""))
        return groups

    # -- reports ---------------------------------------------------------------------

    def create_report(
        self,
        *,
        group: ReportGroup,
        sop_instance_uid: str,
        series_instance_uid: str,
        destination: str,
        path: str | Path,
        instance_ids: Sequence[int],
        instance_count: int,
        suspected_count: int,
        max_score: float | None,
    ) -> int | None:
        """Queue an SR for one destination (status pending, due now).

        Returns the report id, or None when this SR UID is already queued for this
        destination (idempotent: a rebuilt identical SR is not sent twice).
        """
        ids = sorted(set(int(i) for i in instance_ids))
        if not ids:
            raise ValueError("a report needs at least one instance id")
        now = self._now()

        def already(s: Session) -> bool:
            return (
                s.scalar(
                    select(Report.id).where(Report.sop_instance_uid == sop_instance_uid, Report.destination == destination)
                )
                is not None
            )

        try:
            with self.db.session() as s:
                if already(s):
                    return None
                report = Report(
                    sop_instance_uid=sop_instance_uid,
                    series_instance_uid=series_instance_uid,
                    study_instance_uid=group.study_instance_uid,
                    source_series_instance_uid=group.series_instance_uid,
                    destination=destination,
                    status="pending",
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                    path=str(path),
                    instance_count=instance_count,
                    suspected_count=suspected_count,
                    max_score=max_score,
                    node_id=self.node_id,
                )
                s.add(report)
                s.flush()
                s.add_all(ReportInstance(report_id=report.id, instance_id=i) for i in ids)
                for chunk in _chunks(ids):
                    s.execute(
                        update(Instance)
                        .where(Instance.id.in_(chunk), Instance.reported_at.is_(None))
                        .values(reported_at=now)
                        .execution_options(synchronize_session=False)
                    )
                # Older versions of the same objects (same SOP UID, other bytes) are superseded:
                # mark them so ready_groups stops looking at them.
                in_report = select(Instance.sop_instance_uid).where(Instance.id.in_(ids)).scalar_subquery()
                where = [
                    Instance.status == "analysed",
                    Instance.reported_at.is_(None),
                    Instance.study_instance_uid == group.study_instance_uid,
                    Instance.sop_instance_uid.in_(in_report),
                ]
                if group.series_instance_uid is not None:
                    where.append(Instance.series_instance_uid == group.series_instance_uid)
                s.execute(update(Instance).where(*where).values(reported_at=now).execution_options(synchronize_session=False))
                self._event(
                    s, "report", report.id, None, "pending", now,
                    sop_instance_uid=sop_instance_uid, destination=destination, instance_count=instance_count,
                    suspected_count=suspected_count, max_score=max_score,
                )
                return report.id
        except IntegrityError:
            with self.db.read_session() as s:
                if already(s):
                    return None
            raise

    def report_records(self, s: Session, rows: Sequence[Report]) -> list[ReportRecord]:
        """Records of report rows with their instance ids (one query per 500 reports)."""
        links: dict[int, list[int]] = {r.id: [] for r in rows}
        for chunk in _chunks(list(links)):
            for report_id, instance_id in s.execute(
                select(ReportInstance.report_id, ReportInstance.instance_id).where(ReportInstance.report_id.in_(chunk))
            ):
                links[report_id].append(instance_id)
        names = [f.name for f in fields(ReportRecord) if f.name != "instance_ids"]
        return [ReportRecord(**{n: getattr(r, n) for n in names}, instance_ids=tuple(sorted(links[r.id]))) for r in rows]

    def claim_due_reports(self, now: datetime | None = None, limit: int = 10) -> list[ReportRecord]:
        """Move due pending/retrying reports (``next_attempt_at <= now``) to sending, earliest first."""
        if limit <= 0:
            return []
        now = self._now() if now is None else aware_utc(now, "now")
        with self.db.session() as s:
            due = and_(
                Report.status.in_(("pending", "retrying")), Report.next_attempt_at <= now, self._mine(Report.node_id)
            )
            query = select(Report.id, Report.status).where(due).order_by(Report.next_attempt_at, Report.id).limit(limit)
            if self.db.is_postgresql:
                query = query.with_for_update(skip_locked=True)
            claimed: list[int] = []
            for report_id, status in s.execute(query).all():
                result = s.execute(
                    update(Report)
                    .where(Report.id == report_id, Report.status == status)
                    .values(status="sending", claimed_at=now)
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:
                    claimed.append(report_id)
                    self._event(s, "report", report_id, status, "sending", now)
            if not claimed:
                return []
            rows = s.scalars(select(Report).where(Report.id.in_(claimed)).order_by(Report.next_attempt_at, Report.id)).all()
            return self.report_records(s, rows)

    def _report_transition(self, s: Session, report_id: int, allowed: tuple[str, ...], to_status: str) -> Report:
        query = select(Report).where(Report.id == report_id)
        if self.db.is_postgresql:
            query = query.with_for_update()
        row = s.scalars(query).first()
        if row is None:
            raise NotFoundError("report", report_id)
        if row.status not in allowed:
            raise InvalidTransitionError("report", report_id, row.status, to_status)
        return row

    def mark_report_sent(self, report_id: int) -> None:
        now = self._now()
        with self.db.session() as s:
            row = self._report_transition(s, report_id, ("sending",), "sent")
            row.status = "sent"
            row.sent_at = now
            row.claimed_at = None
            row.next_attempt_at = None
            self._event(s, "report", report_id, "sending", "sent", now, destination=row.destination)

    def mark_report_failed(self, report_id: int, error: str, next_attempt_at: datetime | None) -> str:
        """Record a failed send: ``next_attempt_at=None`` -> dead, else retrying. Returns the new status."""
        when = None if next_attempt_at is None else aware_utc(next_attempt_at, "next_attempt_at")
        to_status = "dead" if when is None else "retrying"
        now = self._now()
        with self.db.session() as s:
            row = self._report_transition(s, report_id, ("sending",), to_status)
            row.status = to_status
            row.attempts += 1
            row.last_error = _truncate(error)
            row.next_attempt_at = when
            row.claimed_at = None
            self._event(
                s, "report", report_id, "sending", to_status, now,
                error=row.last_error, attempts=row.attempts, next_attempt_at=when,
            )
        return to_status

    def retry_report(self, report_id: int) -> None:
        """Put a dead (or retrying) report back to pending, due now, with its attempt count reset.

        Raises ``NotFoundError`` for an unknown id and ``InvalidTransitionError``
        for a report that is pending, sending or sent.
        """
        now = self._now()
        with self.db.session() as s:
            row = self._report_transition(s, report_id, ("dead", "retrying"), "pending")
            from_status, attempts = row.status, row.attempts
            row.status = "pending"
            row.next_attempt_at = now
            row.attempts = 0
            self._event(s, "report", report_id, from_status, "pending", now, event="manual retry", previous_attempts=attempts)

    def list_reports(self, status: str | None = None, limit: int = 100) -> list[ReportRecord]:
        """Reports, newest first, optionally of one status."""
        if status is not None and status not in REPORT_STATUSES:
            raise ValueError(f"status={status!r}: expected one of {', '.join(REPORT_STATUSES)}")
        with self.db.read_session() as s:
            query = select(Report).order_by(Report.id.desc()).limit(limit)
            if status is not None:
                query = query.where(Report.status == status)
            return self.report_records(s, s.scalars(query).all())

    def get_report(self, report_id: int) -> ReportRecord | None:
        with self.db.read_session() as s:
            row = s.get(Report, report_id)
            return None if row is None else self.report_records(s, [row])[0]

    # -- retention ---------------------------------------------------------------------

    def spool_files_to_delete(self, delivered_before: datetime, limit: int | None = None) -> list[tuple[int, str]]:
        """(instance id, spool path) of files no longer needed.

        An analysed instance qualifies once it is in at least one report and every
        report it is in (every destination, every version) was sent before
        ``delivered_before``; also an analysed instance superseded by a newer copy
        before it was ever reported. A skipped instance qualifies once received
        before ``delivered_before``. Failed instances keep their files for
        investigation.
        """
        before = aware_utc(delivered_before, "delivered_before")
        linked = exists().where(ReportInstance.instance_id == Instance.id)
        unfinished = exists().where(
            ReportInstance.instance_id == Instance.id,
            ReportInstance.report_id == Report.id,
            or_(Report.status != "sent", Report.sent_at.is_(None), Report.sent_at >= before),
        )
        delivered = and_(Instance.status == "analysed", linked, ~unfinished)
        superseded = and_(
            Instance.status == "analysed", ~linked, Instance.reported_at.is_not(None), Instance.reported_at < before
        )
        skipped = and_(Instance.status == "skipped", Instance.received_at < before)
        query = (
            select(Instance.id, Instance.spool_path)
            .where(Instance.spool_path.is_not(None), self._mine(Instance.node_id), or_(delivered, superseded, skipped))
            .order_by(Instance.id)
        )
        if limit is not None:
            query = query.limit(limit)
        with self.db.read_session() as s:
            return [(i, p) for i, p in s.execute(query).all()]

    def mark_spool_deleted(self, instance_id: int) -> bool:
        """Record that the instance's spool file is gone; False when it was already recorded."""
        now = self._now()
        with self.db.session() as s:
            row = s.get(Instance, instance_id)
            if row is None:
                raise NotFoundError("instance", instance_id)
            if row.spool_path is None:
                return False
            self._event(s, "instance", instance_id, row.status, row.status, now, event="spool file deleted", path=row.spool_path)
            row.spool_path = None
            row.spool_deleted_at = now
            return True

    # -- reads -----------------------------------------------------------------------------

    def get_instance(self, instance_id: int) -> InstanceRecord | None:
        with self.db.read_session() as s:
            row = s.get(Instance, instance_id)
            return None if row is None else instance_record(row)

    def recorded_receipts(self, receipts: Iterable[tuple[str, datetime, str]]) -> set[str]:
        """Which receipts (SOP Instance UID, time of receipt, spool path) are already recorded;
        returns their spool paths. How a journal record applied before a crash is told from
        one that was not (``storage.journal_apply``): a row with the same UID and time of
        receipt (even if retention has since removed its file), or, for a duplicate, the
        "duplicate received" event that names the record's spool path."""
        wanted = [(uid, aware_utc(at, "received_at"), path) for uid, at, path in receipts]
        uids = sorted({uid for uid, _, _ in wanted})
        rows: dict[str, list[tuple[int, datetime]]] = {}
        with self.db.read_session() as s:
            for chunk in _chunks(uids):  # type: ignore[arg-type]
                query = select(Instance.id, Instance.sop_instance_uid, Instance.received_at).where(
                    Instance.sop_instance_uid.in_(chunk)
                )
                for instance_id, uid, at in s.execute(query):
                    rows.setdefault(uid, []).append((instance_id, at.astimezone(timezone.utc)))
            found: set[str] = set()
            for uid, at, path in wanted:
                held = rows.get(uid, [])
                if any(row_at == at for _, row_at in held):
                    found.add(path)
                elif held and s.scalar(
                    select(Event.id).where(
                        Event.entity == "instance",
                        Event.entity_id.in_([instance_id for instance_id, _ in held]),
                        Event.detail.contains(json.dumps(path), autoescape=True),
                    ).limit(1)
                ) is not None:
                    found.add(path)
        return found

    def instances_for(self, ids: Iterable[int]) -> list[InstanceRecord]:
        """Records of these instances, ordered by id (unknown ids are left out)."""
        wanted = sorted(set(ids))
        out: list[InstanceRecord] = []
        with self.db.read_session() as s:
            for chunk in _chunks(wanted):
                out.extend(instance_record(r) for r in s.scalars(select(Instance).where(Instance.id.in_(chunk))))
        return sorted(out, key=lambda r: r.id)

    def verdicts_for(self, ids: Iterable[int]) -> dict[int, VerdictRecord]:
        """Verdicts keyed by instance id (instances without a verdict are left out)."""
        wanted = sorted(set(ids))
        out: dict[int, VerdictRecord] = {}
        with self.db.read_session() as s:
            for chunk in _chunks(wanted):
                for r in s.scalars(select(Verdict).where(Verdict.instance_id.in_(chunk))):
                    out[r.instance_id] = verdict_record(r)
        return out

    def source_headers(self, ids: Iterable[int]) -> dict[int, bytes]:
        """Stored source headers keyed by instance id (instances without one are left out)."""
        wanted = sorted(set(ids))
        out: dict[int, bytes] = {}
        with self.db.read_session() as s:
            for chunk in _chunks(wanted):
                for instance_id, header in s.execute(
                    select(Verdict.instance_id, Verdict.source_header).where(
                        Verdict.instance_id.in_(chunk), Verdict.source_header.is_not(None)
                    )
                ):
                    out[instance_id] = bytes(header)
        return out

    def status_summary(self, error_limit: int = 10) -> StatusSummary:
        with self.db.read_session() as s:
            instances = dict.fromkeys(INSTANCE_STATUSES, 0)
            instances.update(dict(s.execute(select(Instance.status, func.count()).group_by(Instance.status)).all()))
            reports = dict.fromkeys(REPORT_STATUSES, 0)
            reports.update(dict(s.execute(select(Report.status, func.count()).group_by(Report.status)).all()))
            oldest = s.scalar(
                select(func.min(Instance.received_at)).where(Instance.status.in_(("received", "analysing")))
            )
            errors = s.scalars(
                select(Event)
                .where(
                    or_(
                        and_(Event.entity == "instance", Event.to_status == "failed"),
                        and_(Event.entity == "report", Event.to_status.in_(("retrying", "dead"))),
                    )
                )
                .order_by(Event.at.desc(), Event.id.desc())
                .limit(error_limit)
            ).all()
            recent = []
            for e in errors:
                detail = json.loads(e.detail) if e.detail else {}
                message = detail.get("reason") or detail.get("error") or ""
                recent.append(ErrorRecord(e.entity, int(e.entity_id or 0), e.at, e.to_status or "", str(message)))
        return StatusSummary(instances, reports, oldest, recent)

    # -- reconciliation ---------------------------------------------------------------------

    def reconcile_spool(
        self,
        spool: Spool,
        quarantine_dir: Path | str,
        *,
        min_age: timedelta = timedelta(seconds=60),
        temp_max_age: timedelta = timedelta(hours=1),
    ) -> ReconcileResult:
        """Make the spool and the database agree (at start-up, or periodically).

        A spool file with no row was never acknowledged (crash between write and
        commit, or a duplicate whose deletion was cut short): it is quarantined with
        a node event. ``min_age`` spares files younger than that, which may belong to
        a C-STORE between its write and its commit. A received or analysing row whose
        file is missing goes to failed ("spool file missing").
        """
        now = self._now()
        temp_removed = spool.remove_stale_temp_files(temp_max_age.total_seconds())
        with self.db.read_session() as s:
            known = set(s.scalars(select(Instance.spool_path).where(Instance.spool_path.is_not(None))))
        youngest = time.time() - min_age.total_seconds()
        checked = 0
        quarantined: list[tuple[str, Path]] = []
        for rel in spool.iter_files():
            checked += 1
            key = rel.as_posix()
            if key in known:
                continue
            try:
                if (spool.root / rel).stat().st_mtime > youngest:
                    continue
                # re-check: the row may have been committed since the snapshot above
                with self.db.read_session() as s:
                    if s.scalar(select(Instance.id).where(Instance.spool_path == key)) is not None:
                        continue
                target = spool.quarantine(rel, quarantine_dir, "no database row: never acknowledged")
            except (FileNotFoundError, SpoolError) as exc:
                logger.warning("cannot quarantine orphan spool file", extra={"path": key, "error": str(exc)})
                continue
            quarantined.append((key, target))
        missing: list[int] = []
        with self.db.session() as s:
            for key, target in quarantined:
                self._event(s, "node", None, None, None, now, event="orphan spool file quarantined", path=key, to=str(target))
            rows = s.execute(
                select(Instance.id, Instance.status, Instance.spool_path).where(
                    Instance.status.in_(("received", "analysing")),
                    Instance.spool_path.is_not(None),
                    self._mine(Instance.node_id),
                )
            ).all()
            for instance_id, status, path in rows:
                try:
                    if spool.exists(path):
                        continue
                except SpoolError:  # a path outside the spool is as good as missing
                    pass
                result = s.execute(
                    update(Instance)
                    .where(Instance.id == instance_id, Instance.status == status)
                    .values(status="failed", status_reason="spool file missing")
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:
                    missing.append(instance_id)
                    self._event(s, "instance", instance_id, status, "failed", now, reason="spool file missing", path=path)
        if quarantined or missing or temp_removed:
            logger.warning(
                "spool reconciled",
                extra={"quarantined": len(quarantined), "missing": len(missing), "temp_removed": temp_removed},
            )
        return ReconcileResult(checked, quarantined, missing, temp_removed)
