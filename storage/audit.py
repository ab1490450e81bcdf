"""Read-only queries for auditors and ``dski status``.

Nothing here writes: every query runs in a read transaction that is rolled back
(on SQLite a deferred one, so an auditor's query never blocks the listener).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from storage.database import Database
from storage.models import Event, Instance, Report, ReportInstance, Verdict
from storage.repository import (
    InstanceRecord,
    ReportRecord,
    Repository,
    VerdictRecord,
    aware_utc,
    instance_record,
    verdict_record,
)

__all__ = ["AuditLog", "EventRecord", "InstanceHistory", "VerdictAuditRow"]


@dataclass(frozen=True)
class EventRecord:
    id: int
    at: datetime
    entity: str
    entity_id: int | None
    from_status: str | None
    to_status: str | None
    detail: dict[str, Any]  # parsed JSON ({} when none)


@dataclass(frozen=True)
class InstanceHistory:
    """One stored version of an object (same SOP UID with other bytes is another version)."""

    instance: InstanceRecord
    verdict: VerdictRecord | None
    events: list[EventRecord]  # oldest first
    reports: list[ReportRecord]  # every report (all destinations) that listed this version


@dataclass(frozen=True)
class VerdictAuditRow:
    verdict: VerdictRecord
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str | None
    modality: str | None
    calling_ae: str
    received_at: datetime


def _event_record(e: Event) -> EventRecord:
    detail: dict[str, Any]
    try:
        detail = json.loads(e.detail) if e.detail else {}
    except ValueError:
        detail = {"text": e.detail}
    return EventRecord(e.id, e.at, e.entity, e.entity_id, e.from_status, e.to_status, detail)


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._repo = Repository(db)

    def instance_history(self, sop_instance_uid: str) -> list[InstanceHistory]:
        """Every version received under this SOP Instance UID, oldest first, with its full trail."""
        with self.db.read_session() as s:
            rows = s.scalars(
                select(Instance).where(Instance.sop_instance_uid == sop_instance_uid).order_by(Instance.id)
            ).all()
            out = []
            for row in rows:
                verdict = s.scalars(select(Verdict).where(Verdict.instance_id == row.id)).first()
                events = s.scalars(
                    select(Event).where(Event.entity == "instance", Event.entity_id == row.id).order_by(Event.id)
                ).all()
                reports = s.scalars(
                    select(Report)
                    .join(ReportInstance, ReportInstance.report_id == Report.id)
                    .where(ReportInstance.instance_id == row.id)
                    .order_by(Report.id)
                ).all()
                report_ids = [r.id for r in reports]
                report_events = (
                    s.scalars(
                        select(Event)
                        .where(Event.entity == "report", Event.entity_id.in_(report_ids))
                        .order_by(Event.id)
                    ).all()
                    if report_ids
                    else []
                )
                trail = sorted([*events, *report_events], key=lambda e: e.id)
                out.append(
                    InstanceHistory(
                        instance=instance_record(row),
                        verdict=None if verdict is None else verdict_record(verdict),
                        events=[_event_record(e) for e in trail],
                        reports=self._repo.report_records(s, reports),
                    )
                )
            return out

    def verdicts_between(self, start: datetime, end: datetime, label: str | None = None) -> list[VerdictAuditRow]:
        """Verdicts created in ``[start, end)``, oldest first, optionally only one label ("fake"/"real")."""
        start = aware_utc(start, "start")
        end = aware_utc(end, "end")
        query = (
            select(Verdict, Instance)
            .join(Instance, Instance.id == Verdict.instance_id)
            .where(Verdict.created_at >= start, Verdict.created_at < end)
            .order_by(Verdict.created_at, Verdict.id)
        )
        if label is not None:
            query = query.where(Verdict.label == label)
        with self.db.read_session() as s:
            return [
                VerdictAuditRow(
                    verdict=verdict_record(v),
                    sop_instance_uid=i.sop_instance_uid,
                    study_instance_uid=i.study_instance_uid,
                    series_instance_uid=i.series_instance_uid,
                    patient_id=i.patient_id,
                    modality=i.modality,
                    calling_ae=i.calling_ae,
                    received_at=i.received_at,
                )
                for v, i in s.execute(query).all()
            ]

    def reports_for_study(self, study_instance_uid: str) -> list[ReportRecord]:
        """Every report (every destination, every version) of a study, oldest first."""
        with self.db.read_session() as s:
            rows = s.scalars(
                select(Report).where(Report.study_instance_uid == study_instance_uid).order_by(Report.id)
            ).all()
            return self._repo.report_records(s, rows)

    def events_between(self, start: datetime, end: datetime, entity: str | None = None) -> list[EventRecord]:
        """The raw event log in ``[start, end)``, oldest first."""
        query = select(Event).where(Event.at >= aware_utc(start, "start"), Event.at < aware_utc(end, "end")).order_by(Event.id)
        if entity is not None:
            query = query.where(Event.entity == entity)
        with self.db.read_session() as s:
            return [_event_record(e) for e in s.scalars(query).all()]
