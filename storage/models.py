"""ORM tables of the node's log database (SQLAlchemy 2.x declarative).

The schema is created by the hand-written Alembic migrations in
``storage/migrations/versions``; these classes must stay in step with them
(``tests/storage/test_migrations.py`` compares the two).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    LargeBinary,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

INSTANCE_STATUSES = ("received", "analysing", "analysed", "skipped", "failed")
REPORT_STATUSES = ("pending", "sending", "sent", "retrying", "dead")
EVENT_ENTITIES = ("instance", "report", "node")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always UTC and always timezone-aware in Python.

    PostgreSQL stores ``timestamptz``. SQLite has no time zone support: the value is
    converted to UTC and stored naive (ISO text sorts chronologically), and comes
    back with ``tzinfo=UTC``. Naive datetimes are refused on the way in: guessing
    their zone is how audit logs end up an hour off.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} refused: pass a timezone-aware (UTC) datetime")
        value = value.astimezone(timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


# Partial index predicate shared by the model and the migration.
UNREPORTED_PREDICATE = "status = 'analysed' AND reported_at IS NULL"


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Instance(Base):
    """One received object (one row per distinct content: same SOP UID with other bytes is a new row)."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(255))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    status: Mapped[str] = mapped_column(String(16))
    status_reason: Mapped[str | None] = mapped_column(Text)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    spool_path: Mapped[str | None] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)  # whole-slide objects pass 2 GiB
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    spool_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Set when the instance is first linked to a report. ready_groups looks only at
    # analysed rows where this is NULL, so its cost does not grow with the history.
    reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The node whose spool holds the file (storage.spool.Spool.node_id); NULL: any node
    # (rows from before scale-out). Only that node scores, reconciles and deletes it.
    node_id: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        CheckConstraint(_in("status", INSTANCE_STATUSES), name="status"),
        # Duplicate detection key; also serves lookups by SOP Instance UID (leading column).
        UniqueConstraint("sop_instance_uid", "sha256"),
        Index("ix_instances_status_received_at", "status", "received_at"),
        Index("ix_instances_series_instance_uid", "series_instance_uid"),
        Index("ix_instances_study_instance_uid", "study_instance_uid"),
        Index("ix_instances_node_id_status", "node_id", "status"),
        Index(
            "ix_instances_unreported",
            "study_instance_uid",
            "series_instance_uid",
            sqlite_where=text(UNREPORTED_PREDICATE),
            postgresql_where=text(UNREPORTED_PREDICATE),
        ),
    )


class Verdict(Base):
    __tablename__ = "verdicts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), unique=True)
    score: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[float] = mapped_column(Float)
    classifier_score: Mapped[float] = mapped_column(Float)
    retrieval_score: Mapped[float | None] = mapped_column(Float)
    frames_scored: Mapped[int] = mapped_column(Integer)
    bundle_name: Mapped[str] = mapped_column(String(128))
    bundle_version: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(255))
    elapsed_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # The source object up to its Pixel Data (a DICOM file prefix): lets any node build the SR
    # of a series split across nodes. Deferred: loaded only by Repository.source_headers.
    source_header: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)

    __table_args__ = (Index("ix_verdicts_created_at", "created_at"),)


class Report(Base):
    """One SR for one destination (the outbox row the dispatcher works on)."""

    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))  # of the SR itself
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    source_series_instance_uid: Mapped[str | None] = mapped_column(String(64))  # NULL for study scope
    destination: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # when it went to 'sending'
    path: Mapped[str] = mapped_column(String(1024))
    instance_count: Mapped[int] = mapped_column(Integer)
    suspected_count: Mapped[int] = mapped_column(Integer)
    max_score: Mapped[float | None] = mapped_column(Float)
    # The node whose reports_dir holds the SR file at ``path``: only it sends the report.
    node_id: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        CheckConstraint(_in("status", REPORT_STATUSES), name="status"),
        UniqueConstraint("sop_instance_uid", "destination"),
        Index("ix_reports_status_next_attempt_at", "status", "next_attempt_at"),
        Index("ix_reports_study_instance_uid_source_series_instance_uid", "study_instance_uid", "source_series_instance_uid"),
    )


class ReportInstance(Base):
    __tablename__ = "report_instances"

    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id", ondelete="CASCADE"), primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id", ondelete="CASCADE"), primary_key=True)

    __table_args__ = (Index("ix_report_instances_instance_id", "instance_id"),)


class Event(Base):
    """Append-only history: one row per state change, written in the same transaction."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    entity: Mapped[str] = mapped_column(String(16))
    entity_id: Mapped[int | None] = mapped_column(Integer)
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str | None] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)  # JSON object as text

    __table_args__ = (
        CheckConstraint(_in("entity", EVENT_ENTITIES), name="entity"),
        Index("ix_events_entity_entity_id", "entity", "entity_id"),
        Index("ix_events_at", "at"),
    )

