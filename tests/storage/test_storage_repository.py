from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select, text

from storage.database import Database
from storage.errors import DatabaseUnavailableError, InvalidTransitionError, NotFoundError
from storage.models import Event, Instance
from storage.repository import ReportGroup, Repository, ScoredInstance, VerdictInput

from .conftest import Receive, make_verdict

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def repo(db: Database, clock: Clock) -> Repository:  # overrides conftest: time under the test's control
    return Repository(db, clock=clock)


def events(db: Database, entity: str, entity_id: int | None = None) -> list[tuple[str | None, str | None, dict]]:
    with db.read_session() as s:
        q = select(Event).where(Event.entity == entity).order_by(Event.id)
        if entity_id is not None:
            q = q.where(Event.entity_id == entity_id)
        return [(e.from_status, e.to_status, json.loads(e.detail or "{}")) for e in s.scalars(q)]


def analyse(repo: Repository, ids: list[int], score: float = 0.2) -> None:
    claimed = repo.claim_received("w", 1000)
    assert sorted(r.id for r in claimed) == sorted(ids)
    for i in ids:
        repo.record_verdict(i, make_verdict(score))


# -- instances ---------------------------------------------------------------------


def test_received_row_and_event(repo: Repository, receive: Receive, db: Database) -> None:
    res = receive("1.2.3.4.5")
    assert not res.duplicate
    rec = repo.get_instance(res.instance_id)
    assert rec is not None
    assert rec.status == "received" and rec.attempts == 0 and rec.received_at == T0
    assert rec.spool_path.startswith("2025/01/01/")
    assert events(db, "instance", res.instance_id) == [
        (None, "received", {"event": "received", "calling_ae": "MODALITY", "peer_address": "127.0.0.1:40000",
                            "sop_instance_uid": "1.2.3.4.5", "reason": None})
    ]
    assert repo.get_instance(999) is None


def test_duplicate_detection(repo: Repository, receive: Receive, db: Database) -> None:
    first = receive("1.2.9", data=b"same")
    again = receive("1.2.9", data=b"same")
    assert again.duplicate and again.instance_id == first.instance_id
    changed = receive("1.2.9", data=b"other bytes")
    assert not changed.duplicate and changed.instance_id != first.instance_id
    with db.read_session() as s:
        assert s.scalar(select(text("count(*)")).select_from(Instance)) == 2
    evs = events(db, "instance", first.instance_id)
    assert [e[:2] for e in evs] == [(None, "received"), ("received", "received")]
    assert evs[1][2]["event"] == "duplicate received"


def test_skipped_on_arrival(repo: Repository, receive: Receive) -> None:
    a = receive(skip_reason="non-image: structured report")
    b = receive(status="skipped", reason="own report")
    for res, reason in ((a, "non-image: structured report"), (b, "own report")):
        rec = repo.get_instance(res.instance_id)
        assert rec.status == "skipped" and rec.status_reason == reason
    assert repo.claim_received("w", 10) == []
    with pytest.raises(ValueError):
        receive(status="analysed")


def test_claim_verdict_and_failures(repo: Repository, receive: Receive, db: Database) -> None:
    ids = [receive().instance_id for _ in range(3)]
    claimed = repo.claim_received("worker-1", 2)
    assert [r.id for r in claimed] == ids[:2]  # oldest first
    assert all(r.status == "analysing" and r.claimed_by == "worker-1" and r.attempts == 1 for r in claimed)
    assert repo.claim_received("worker-2", 0) == []

    repo.record_verdict(ids[0], make_verdict(0.9), worker="worker-1")
    v = repo.verdicts_for(ids)
    assert list(v) == [ids[0]] and v[ids[0]].label == "fake" and v[ids[0]].created_at == T0
    assert repo.get_instance(ids[0]).status == "analysed"
    with pytest.raises(InvalidTransitionError):  # already analysed
        repo.record_verdict(ids[0], make_verdict())
    with pytest.raises(InvalidTransitionError):  # someone else's claim
        repo.record_verdict(ids[1], make_verdict(), worker="worker-2")
    with pytest.raises(InvalidTransitionError):  # never claimed
        repo.record_verdict(ids[2], make_verdict())
    with pytest.raises(NotFoundError):
        repo.record_verdict(12345, make_verdict())

    repo.mark_failed(ids[1], "PreprocessError: unsupported pixel data")
    repo.mark_skipped(ids[2], "not an image")
    assert repo.get_instance(ids[1]).status == "failed"
    assert repo.get_instance(ids[2]).status_reason == "not an image"
    with pytest.raises(InvalidTransitionError):
        repo.mark_failed(ids[0], "too late")

    assert [e[:2] for e in events(db, "instance", ids[0])] == [
        (None, "received"), ("received", "analysing"), ("analysing", "analysed")]
    assert [e[:2] for e in events(db, "instance", ids[1])] == [
        (None, "received"), ("received", "analysing"), ("analysing", "failed")]
    assert [e[:2] for e in events(db, "instance", ids[2])] == [(None, "received"), ("received", "skipped")]


def test_claim_returns_the_rows_as_stored_and_their_events_in_order(
    repo: Repository, receive: Receive, clock: Clock, db: Database
) -> None:
    ids = [receive().instance_id for _ in range(4)]
    clock.advance(5)
    claimed = repo.claim_received("worker-7", 3)
    # the records come from the UPDATE's RETURNING: the same values a fresh read gives
    assert claimed == [repo.get_instance(i) for i in ids[:3]]
    assert all(r.claimed_at == T0 + timedelta(seconds=5) and r.received_at == T0 for r in claimed)
    assert all(r.claimed_at.tzinfo is not None and r.received_at.tzinfo is not None for r in claimed)
    with db.read_session() as s:
        moves = s.execute(
            select(Event.entity_id, Event.detail).where(Event.to_status == "analysing").order_by(Event.id)
        ).all()
    assert [m.entity_id for m in moves] == ids[:3]  # oldest first, as claimed
    assert all(json.loads(m.detail) == {"worker": "worker-7"} for m in moves)
    assert repo.get_instance(ids[3]).status == "received"


def test_verdicts_of_a_batch_in_one_call(repo: Repository, receive: Receive, db: Database) -> None:
    ids = [receive().instance_id for _ in range(5)]
    repo.claim_received("worker-1", 3)  # ids[0..2] analysing by worker-1; ids[3], ids[4] received
    repo.record_verdict(ids[2], make_verdict(0.4), worker="worker-1")  # judged before the batch
    items = [
        ScoredInstance(ids[0], VerdictInput.from_verdict(make_verdict(0.9)), b"header-0"),
        ScoredInstance(ids[3], VerdictInput.from_verdict(make_verdict(0.9))),  # never claimed
        ScoredInstance(ids[1], VerdictInput.from_verdict(make_verdict(0.1)), b"header-1"),
        ScoredInstance(ids[2], VerdictInput.from_verdict(make_verdict(0.9))),  # already analysed
        ScoredInstance(ids[0], VerdictInput.from_verdict(make_verdict(0.5))),  # twice in the batch
        ScoredInstance(12345, VerdictInput.from_verdict(make_verdict(0.9))),  # no such instance
    ]
    errors = repo.record_verdicts(items, worker="worker-1")

    assert [type(e).__name__ if e else None for e in errors] == [
        None, "InvalidTransitionError", None, "InvalidTransitionError", "InvalidTransitionError", "NotFoundError"]
    # as if recorded one after the other: the second verdict of ids[0] finds it analysed
    assert "'received' to 'analysed'" in str(errors[1])
    assert "'analysed' to 'analysed'" in str(errors[3]) and "'analysed' to 'analysed'" in str(errors[4])
    verdicts = repo.verdicts_for(ids)
    assert sorted(verdicts) == [ids[0], ids[1], ids[2]]
    assert verdicts[ids[0]].score == 0.9 and verdicts[ids[1]].score == 0.1 and verdicts[ids[2]].score == 0.4
    assert repo.source_headers([ids[0], ids[1]]) == {ids[0]: b"header-0", ids[1]: b"header-1"}
    assert [repo.get_instance(i).status for i in ids] == ["analysed", "analysed", "analysed", "received", "received"]
    for i in (ids[0], ids[1]):  # one event each, naming the worker
        assert [e[:2] for e in events(db, "instance", i)][-1] == ("analysing", "analysed")
        assert sum(e[1] == "analysed" for e in events(db, "instance", i)) == 1
        assert events(db, "instance", i)[-1][2]["worker"] == "worker-1"

    # another worker's batch records nothing of worker-1's claims
    repo.claim_received("worker-1", 1)  # ids[3]
    [error] = repo.record_verdicts([ScoredInstance(ids[3], VerdictInput.from_verdict(make_verdict()))], worker="worker-2")
    assert isinstance(error, InvalidTransitionError) and "worker-1" in str(error)
    assert repo.record_verdicts([], worker="worker-1") == []


def test_verdict_from_duck_typed_object(repo: Repository, receive: Receive) -> None:
    class DetectorVerdict:  # what detector.Verdict looks like
        score, label, threshold, classifier_score, retrieval_score = 0.7, "fake", 0.5, 0.6, 0.8
        frames_scored, bundle_name, bundle_version, model_version, elapsed_ms = 2, "b", "1.0.0", "b@1.0.0+x", 3.0

    i = receive().instance_id
    repo.claim_received("w", 1)
    repo.record_verdict(i, DetectorVerdict())
    assert repo.verdicts_for([i])[i].retrieval_score == 0.8


def test_requeue_in_progress(repo: Repository, receive: Receive, clock: Clock, db: Database) -> None:
    old, young = receive().instance_id, receive().instance_id
    repo.claim_received("w", 1)
    clock.advance(600)
    repo.claim_received("w", 1)
    assert repo.requeue_in_progress(older_than=timedelta(seconds=300)) == 1
    assert repo.get_instance(old).status == "received" and repo.get_instance(old).claimed_by is None
    assert repo.get_instance(young).status == "analysing"
    assert repo.requeue_in_progress() == 1  # start-up: everything
    assert events(db, "instance", old)[-1][:2] == ("analysing", "received")
    # an object that kills its worker every time ends up failed instead of looping
    repo.claim_received("w", 10)  # second attempt
    assert repo.requeue_in_progress(max_attempts=3) == 2
    assert repo.get_instance(old).status == "received"
    assert [r.attempts for r in repo.claim_received("w", 10)] == [3, 3]
    assert repo.requeue_in_progress(max_attempts=3) == 2
    assert repo.get_instance(old).status == "failed"
    assert "gave up after 3 attempts" in repo.get_instance(old).status_reason


def test_naive_datetimes_refused_and_utc_returned(repo: Repository, receive: Receive, db: Database) -> None:
    with pytest.raises(ValueError, match="naive"):
        receive(received_at=datetime(2025, 1, 1, 12, 0))
    with pytest.raises(ValueError, match="naive"):
        repo.ready_groups(30, now=datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="naive"):
        repo.claim_due_reports(datetime(2025, 1, 1))
    cet = timezone(timedelta(hours=1))
    res = receive(received_at=datetime(2025, 1, 1, 13, 0, tzinfo=cet))
    rec = repo.get_instance(res.instance_id)
    assert rec.received_at == datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)
    assert rec.received_at.tzinfo == timezone.utc
    with db.read_session() as s:  # SQLite keeps naive UTC text
        raw = s.execute(text("SELECT received_at FROM instances WHERE id = :i"), {"i": res.instance_id}).scalar()
    assert str(raw).startswith("2025-01-01 12:00:00")


# -- report groups -------------------------------------------------------------------


def test_ready_groups_idle_logic(repo: Repository, receive: Receive, clock: Clock) -> None:
    a1 = receive(series="S1").instance_id
    clock.advance(10)
    a2 = receive(series="S1").instance_id
    b1 = receive(series="S2").instance_id
    assert repo.ready_groups(30, now=T0 + timedelta(seconds=100)) == []  # nothing analysed yet
    analyse(repo, [a1, a2, b1])
    # the newest image of S1 arrived at T0+10: idle 30 s means ready from T0+40
    assert repo.ready_groups(30, now=T0 + timedelta(seconds=39)) == []
    groups = repo.ready_groups(30, now=T0 + timedelta(seconds=40))
    assert [(g.series_instance_uid, g.instance_ids) for g in groups] == [("S1", (a1, a2)), ("S2", (b1,))]
    assert groups[0].scope == "series" and groups[0].previous_report_id is None
    # a new image still waiting for analysis holds the whole series back, and restarts the idle clock
    clock.advance(100)
    a3 = receive(series="S1").instance_id
    assert [g.series_instance_uid for g in repo.ready_groups(30, now=clock.now + timedelta(seconds=60))] == ["S2"]
    repo.claim_received("w", 10)
    assert [g.series_instance_uid for g in repo.ready_groups(30, now=clock.now + timedelta(seconds=60))] == ["S2"]
    repo.mark_failed(a3, "unreadable")  # a failed image is left out; groups come oldest activity first
    groups = repo.ready_groups(30, now=clock.now + timedelta(seconds=60))
    assert [(g.series_instance_uid, g.instance_ids) for g in groups] == [("S2", (b1,)), ("S1", (a1, a2))]


def test_ready_groups_study_scope(repo: Repository, receive: Receive) -> None:
    ids = [receive(series="S1").instance_id, receive(series="S2").instance_id, receive(study="9.9", series="S3").instance_id]
    analyse(repo, ids)
    groups = repo.ready_groups(5, scope="study", now=T0 + timedelta(seconds=5))
    assert [(g.study_instance_uid, g.series_instance_uid, g.instance_ids) for g in groups] == [
        ("1.2.3", None, (ids[0], ids[1])), ("9.9", None, (ids[2],))]
    assert groups[0].scope == "study"
    with pytest.raises(ValueError):
        repo.ready_groups(5, scope="patient")


def _report(repo: Repository, group: ReportGroup, uid: str, destination: str = "PACS") -> int | None:
    return repo.create_report(
        group=group, sop_instance_uid=uid, series_instance_uid=uid + ".1", destination=destination,
        path=f"/var/reports/{uid}.dcm", instance_ids=group.instance_ids, instance_count=len(group.instance_ids),
        suspected_count=0, max_score=0.2,
    )


def test_resent_series_gives_no_new_group_but_new_images_do(
    repo: Repository, receive: Receive, clock: Clock
) -> None:
    ids = [receive(f"1.5.{n}", series="S1", data=f"img{n}".encode()).instance_id for n in range(3)]
    analyse(repo, ids)
    later = lambda: clock.now + timedelta(seconds=60)  # noqa: E731
    (group,) = repo.ready_groups(30, now=later())
    for dest in ("PACS", "ARCHIVE"):  # one SR, one outbox row per destination
        assert _report(repo, group, "2.25.1", dest) is not None
    assert repo.ready_groups(30, now=later()) == []
    # the modality sends the same series again: duplicates, no new rows, no new group
    clock.advance(100)
    for n in range(3):
        assert receive(f"1.5.{n}", series="S1", data=f"img{n}".encode()).duplicate
    assert repo.ready_groups(30, now=later()) == []
    # then one more image: a new group with all four
    new = receive("1.5.3", series="S1", data=b"img3").instance_id
    analyse(repo, [new])
    (group2,) = repo.ready_groups(30, now=later())
    assert group2.instance_ids == (*ids, new) and group2.previous_report_id is not None
    assert _report(repo, group2, "2.25.2") is not None
    assert repo.ready_groups(30, now=later()) == []
    # a changed object (same SOP UID, other bytes) replaces the old version
    changed = receive("1.5.0", series="S1", data=b"img0 corrected").instance_id
    analyse(repo, [changed])
    (group3,) = repo.ready_groups(30, now=later())
    assert group3.instance_ids == (ids[1], ids[2], new, changed)


def test_superseded_unreported_version_is_settled_by_the_report(
    repo: Repository, receive: Receive, clock: Clock
) -> None:
    v1 = receive("1.6.1", series="S9", data=b"v1").instance_id
    analyse(repo, [v1])
    v2 = receive("1.6.1", series="S9", data=b"v2").instance_id
    analyse(repo, [v2])
    (group,) = repo.ready_groups(30, now=clock.now + timedelta(seconds=60))
    assert group.instance_ids == (v2,)
    _report(repo, group, "2.25.9")
    assert repo.get_instance(v1).reported_at is not None  # not a candidate any more
    assert repo.ready_groups(30, now=clock.now + timedelta(seconds=60)) == []


# -- reports ------------------------------------------------------------------------


def _ready_group(repo: Repository, receive: Receive, clock: Clock, series: str = "S1") -> ReportGroup:
    ids = [receive(series=series).instance_id for _ in range(2)]
    analyse(repo, ids, score=0.8)
    (group,) = repo.ready_groups(30, now=clock.now + timedelta(seconds=60))
    return group


def test_create_report_is_idempotent_per_destination(repo: Repository, receive: Receive, clock: Clock, db: Database) -> None:
    group = _ready_group(repo, receive, clock)
    rid = _report(repo, group, "2.25.7")
    assert rid is not None
    assert _report(repo, group, "2.25.7") is None
    other = _report(repo, group, "2.25.7", destination="ARCHIVE")
    assert other is not None and other != rid
    (rec,) = repo.list_reports(status="pending", limit=1)
    assert rec.id == other and rec.instance_ids == group.instance_ids
    assert rec.study_instance_uid == "1.2.3" and rec.source_series_instance_uid == "S1"
    assert events(db, "report", rid)[0][:2] == (None, "pending")
    with pytest.raises(ValueError):
        repo.create_report(group=group, sop_instance_uid="2.25.8", series_instance_uid="2.25.8.1", destination="X",
                           path="p", instance_ids=[], instance_count=0, suspected_count=0, max_score=None)


def test_report_state_machine(repo: Repository, receive: Receive, clock: Clock, db: Database) -> None:
    group = _ready_group(repo, receive, clock)
    rid = _report(repo, group, "2.25.3")
    assert repo.claim_due_reports(clock.now - timedelta(seconds=1)) == []  # not yet due
    (claimed,) = repo.claim_due_reports(clock.now, limit=5)
    assert claimed.id == rid and claimed.status == "sending" and claimed.instance_ids == group.instance_ids
    assert repo.claim_due_reports(clock.now) == []  # already sending
    with pytest.raises(InvalidTransitionError):
        repo.retry_report(rid)  # sending

    retry_at = clock.now + timedelta(seconds=5)
    assert repo.mark_report_failed(rid, "association rejected", retry_at) == "retrying"
    rec = repo.get_report(rid)
    assert rec.status == "retrying" and rec.attempts == 1 and rec.next_attempt_at == retry_at
    assert rec.last_error == "association rejected"
    assert repo.claim_due_reports(clock.now) == []
    clock.advance(5)
    (claimed,) = repo.claim_due_reports(clock.now)
    assert repo.mark_report_failed(rid, "timeout", None) == "dead"
    rec = repo.get_report(rid)
    assert rec.status == "dead" and rec.attempts == 2 and rec.next_attempt_at is None
    assert repo.claim_due_reports(clock.now + timedelta(days=365)) == []
    with pytest.raises(InvalidTransitionError):
        repo.mark_report_sent(rid)  # dead, not sending

    repo.retry_report(rid)  # by hand
    rec = repo.get_report(rid)
    assert rec.status == "pending" and rec.attempts == 0 and rec.next_attempt_at == clock.now
    repo.claim_due_reports(clock.now)
    repo.mark_report_sent(rid)
    rec = repo.get_report(rid)
    assert rec.status == "sent" and rec.sent_at == clock.now
    with pytest.raises(InvalidTransitionError):
        repo.retry_report(rid)
    with pytest.raises(NotFoundError) as info:
        repo.retry_report(4242)
    assert isinstance(info.value, KeyError)
    assert [e[:2] for e in events(db, "report", rid)] == [
        (None, "pending"), ("pending", "sending"), ("sending", "retrying"), ("retrying", "sending"),
        ("sending", "dead"), ("dead", "pending"), ("pending", "sending"), ("sending", "sent")]
    assert [r.id for r in repo.list_reports("sent")] == [rid]
    with pytest.raises(ValueError):
        repo.list_reports("lost")


def test_requeue_sending_reports(repo: Repository, receive: Receive, clock: Clock, db: Database) -> None:
    rid = _report(repo, _ready_group(repo, receive, clock), "2.25.4")
    repo.claim_due_reports(clock.now)
    clock.advance(10)
    assert repo.requeue_in_progress(older_than=timedelta(seconds=60)) == 0
    assert repo.requeue_in_progress(older_than=timedelta(seconds=5)) == 1
    rec = repo.get_report(rid)
    assert rec.status == "pending" and rec.next_attempt_at == clock.now
    assert events(db, "report", rid)[-1][:2] == ("sending", "pending")


def test_retention_candidates(repo: Repository, receive: Receive, clock: Clock, db: Database) -> None:
    group = _ready_group(repo, receive, clock)
    r1, r2 = _report(repo, group, "2.25.5", "PACS"), _report(repo, group, "2.25.5", "ARCHIVE")
    skipped = receive(skip_reason="non-image").instance_id
    failed = receive().instance_id
    repo.mark_failed(failed, "unreadable")
    clock.advance(10)
    assert repo.spool_files_to_delete(clock.now - timedelta(seconds=5)) == [(skipped, repo.get_instance(skipped).spool_path)]
    repo.claim_due_reports(clock.now)
    repo.mark_report_sent(r1)
    clock.advance(10)
    assert [i for i, _ in repo.spool_files_to_delete(clock.now)] == [skipped]  # ARCHIVE not delivered yet
    repo.mark_report_sent(r2)
    sent_at = clock.now
    assert [i for i, _ in repo.spool_files_to_delete(sent_at)] == [skipped]  # keep window not over
    clock.advance(3600)
    due = repo.spool_files_to_delete(clock.now)
    assert [i for i, _ in due] == [*group.instance_ids, skipped]  # failed one is kept
    assert repo.spool_files_to_delete(clock.now, limit=1) == due[:1]
    assert repo.mark_spool_deleted(due[0][0]) is True
    assert repo.mark_spool_deleted(due[0][0]) is False
    rec = repo.get_instance(due[0][0])
    assert rec.spool_path is None and rec.spool_deleted_at == clock.now
    assert events(db, "instance", due[0][0])[-1][2] == {"event": "spool file deleted", "path": due[0][1]}
    assert len(repo.spool_files_to_delete(clock.now)) == 2
    with pytest.raises(NotFoundError):
        repo.mark_spool_deleted(999)


def test_status_summary(repo: Repository, receive: Receive, clock: Clock) -> None:
    group = _ready_group(repo, receive, clock)
    rid = _report(repo, group, "2.25.6")
    first_pending = clock.now
    receive()
    clock.advance(1)
    receive()
    bad = receive().instance_id
    repo.claim_received("w", 10)
    repo.mark_failed(bad, "PreprocessError: no pixel data")
    clock.advance(1)
    repo.claim_due_reports(clock.now)
    repo.mark_report_failed(rid, "connection refused", None)
    summary = repo.status_summary()
    assert summary.instances == {"received": 0, "analysing": 2, "analysed": 2, "skipped": 0, "failed": 1}
    assert summary.reports == {"pending": 0, "sending": 0, "sent": 0, "retrying": 0, "dead": 1}
    assert summary.oldest_pending_received_at == first_pending
    assert [(e.entity, e.entity_id, e.status, e.message) for e in summary.recent_errors] == [
        ("report", rid, "dead", "connection refused"), ("instance", bad, "failed", "PreprocessError: no pixel data")]
    assert summary.recent_errors[0].at.tzinfo == timezone.utc


# -- database errors -------------------------------------------------------------------


def test_unreachable_database_is_unavailable(tmp_path: Path) -> None:
    folder = tmp_path / "a-folder-not-a-file"
    folder.mkdir()
    db = Database(f"sqlite:///{folder}")
    with pytest.raises(DatabaseUnavailableError):
        db.migrate()
    with pytest.raises(DatabaseUnavailableError):
        Repository(db).status_summary()


def test_locked_database_is_unavailable_after_busy_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, receive: Receive
) -> None:
    import storage.database as database_module

    monkeypatch.setattr(database_module, "BUSY_TIMEOUT_MS", 200)
    url = f"sqlite:///{tmp_path / 'locked.sqlite3'}"
    a, b = Database(url), Database(url)
    a.migrate()
    try:
        with a.session() as s:
            s.execute(text("SELECT 1"))  # BEGIN IMMEDIATE: now holds the write lock
            with pytest.raises(DatabaseUnavailableError, match="locked"):
                Repository(b).claim_received("w", 1)
            assert Repository(b).status_summary().instances["received"] == 0  # readers are not blocked
    finally:
        a.dispose()
        b.dispose()
