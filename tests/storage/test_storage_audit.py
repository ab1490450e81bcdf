from __future__ import annotations

from datetime import datetime, timedelta, timezone

from storage.audit import AuditLog
from storage.database import Database
from storage.repository import Repository

from .conftest import Receive, make_verdict


def test_audit_queries(repo: Repository, receive: Receive, db: Database) -> None:
    start = datetime.now(timezone.utc) - timedelta(seconds=1)
    v1 = receive("1.7.1", series="S1", data=b"v1").instance_id
    other = receive("1.7.2", series="S1").instance_id
    repo.claim_received("w", 10)
    repo.record_verdict(v1, make_verdict(0.9))
    repo.record_verdict(other, make_verdict(0.1))
    (group,) = repo.ready_groups(0, now=datetime.now(timezone.utc) + timedelta(seconds=1))
    rid = repo.create_report(group=group, sop_instance_uid="2.25.77", series_instance_uid="2.25.78",
                             destination="PACS", path="r.dcm", instance_ids=group.instance_ids,
                             instance_count=2, suspected_count=1, max_score=0.9)
    repo.claim_due_reports()
    repo.mark_report_sent(rid)
    v2 = receive("1.7.1", series="S1", data=b"v2").instance_id
    end = datetime.now(timezone.utc) + timedelta(seconds=1)

    audit = AuditLog(db)
    history = audit.instance_history("1.7.1")
    assert [h.instance.id for h in history] == [v1, v2]
    h1 = history[0]
    assert h1.verdict.score == 0.9 and h1.verdict.label == "fake"
    assert [r.id for r in h1.reports] == [rid] and h1.reports[0].status == "sent"
    trail = [(e.entity, e.from_status, e.to_status) for e in h1.events]
    assert trail == [
        ("instance", None, "received"), ("instance", "received", "analysing"), ("instance", "analysing", "analysed"),
        ("report", None, "pending"), ("report", "pending", "sending"), ("report", "sending", "sent")]
    assert all(e.at.tzinfo == timezone.utc for e in h1.events)
    assert history[1].verdict is None and history[1].reports == []
    assert audit.instance_history("9.9.9") == []

    rows = audit.verdicts_between(start, end)
    assert [r.sop_instance_uid for r in rows] == ["1.7.1", "1.7.2"]
    assert [r.sop_instance_uid for r in audit.verdicts_between(start, end, label="fake")] == ["1.7.1"]
    assert audit.verdicts_between(end, end + timedelta(days=1)) == []

    (report,) = audit.reports_for_study("1.2.3")
    assert report.sop_instance_uid == "2.25.77" and report.instance_ids == (v1, other)
    assert audit.reports_for_study("0.0") == []
    assert len(audit.events_between(start, end, entity="report")) == 3
