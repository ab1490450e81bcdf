"""The same claims against a throwaway PostgreSQL cluster (FOR UPDATE SKIP LOCKED path).

Skipped when the PostgreSQL server binaries or psycopg are missing. The cluster comes
from ``tests.pgserver`` (under root it runs as ``nobody``: initdb refuses root).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest

pytest.importorskip("psycopg", reason="psycopg not installed (pip install -e '.[postgres]')")

from alembic.autogenerate import compare_metadata  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from storage.database import Database  # noqa: E402
from storage.models import Base  # noqa: E402
from storage.repository import Repository, ScoredInstance, VerdictInput  # noqa: E402
from tests.pgserver import postgres_or_skip  # noqa: E402

from .conftest import make_verdict  # noqa: E402


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    for server in postgres_or_skip(max_connections=40):
        yield server.url()


_names = itertools.count()


@pytest.fixture
def pg_db(pg_url: str) -> Iterator[Database]:
    name = f"dski_{os.getpid()}_{next(_names)}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    db = Database(pg_url.rsplit("/", 1)[0] + "/" + name)
    db.migrate()
    yield db
    db.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def _receive(repo: Repository, n: int, series: str = "S") -> int:
    return repo.record_received(
        sop_instance_uid=f"1.8.{n}", sop_class_uid="1.2", study_instance_uid="1.8", series_instance_uid=series,
        patient_id=None, modality="CT", transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="M",
        peer_address="127.0.0.1:1", spool_path=f"x/{n}.dcm", sha256=f"{n:064x}", size_bytes=1,
    ).instance_id


def test_pg_schema_matches_models_and_migrate_is_idempotent(pg_db: Database) -> None:
    pg_db.migrate()
    assert pg_db.current_revision() == "0002"
    with pg_db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata) == []


def test_pg_claim_race(pg_db: Database) -> None:
    repo = Repository(pg_db)
    all_ids = {_receive(repo, n) for n in range(200)}
    assert repo.record_received(
        sop_instance_uid="1.8.0", sop_class_uid="1.2", study_instance_uid="1.8", series_instance_uid="S",
        patient_id=None, modality="CT", transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="M",
        peer_address="127.0.0.1:1", spool_path="x/dup.dcm", sha256=f"{0:064x}", size_bytes=1,
    ).duplicate
    dbs = [Database(pg_db.url) for _ in range(4)]
    results: list[list[int]] = [[] for _ in dbs]
    barrier = threading.Barrier(len(dbs))
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            worker = Repository(dbs[k])
            barrier.wait()
            while claimed := worker.claim_received(f"w{k}", 3):
                results[k].extend(r.id for r in claimed)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(dbs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for d in dbs:
        d.dispose()
    assert errors == []
    counts = Counter(i for r in results for i in r)
    assert [i for i, n in counts.items() if n > 1] == []
    assert set(counts) == all_ids


def test_pg_lifecycle_and_timestamptz(pg_db: Database) -> None:
    repo = Repository(pg_db)
    cet = timezone(timedelta(hours=1))
    at = datetime(2025, 1, 1, 13, 0, tzinfo=cet)
    ids = [repo.record_received(
        sop_instance_uid=f"1.9.{n}", sop_class_uid="1.2", study_instance_uid="1.9", series_instance_uid="S9",
        patient_id="P", modality="MR", transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="M",
        peer_address="127.0.0.1:1", spool_path=f"y/{n}.dcm", sha256=f"{n:064x}", size_bytes=1, received_at=at,
    ).instance_id for n in range(2)]
    assert repo.get_instance(ids[0]).received_at == datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)
    repo.claim_received("w", 10)
    for i in ids:
        repo.record_verdict(i, make_verdict(0.7))
    (group,) = repo.ready_groups(30, now=datetime(2025, 1, 1, 12, 1, tzinfo=timezone.utc))
    rid = repo.create_report(group=group, sop_instance_uid="2.25.5", series_instance_uid="2.25.6", destination="PACS",
                             path="r", instance_ids=group.instance_ids, instance_count=2, suspected_count=2,
                             max_score=0.7)
    assert repo.create_report(group=group, sop_instance_uid="2.25.5", series_instance_uid="2.25.6",
                              destination="PACS", path="r", instance_ids=group.instance_ids, instance_count=2,
                              suspected_count=2, max_score=0.7) is None
    (claimed,) = repo.claim_due_reports()
    assert claimed.id == rid
    repo.mark_report_failed(rid, "refused", None)
    repo.retry_report(rid)
    repo.claim_due_reports()
    repo.mark_report_sent(rid)
    assert repo.status_summary().reports["sent"] == 1
    assert repo.requeue_in_progress() == 0


def test_pg_node_scoped_claims(pg_db: Database) -> None:
    """Two nodes on one database: each claims, requeues and dispatches only its own rows
    (rows without a node id, from before scale-out, belong to every node until one claims them)."""
    legacy = _receive(Repository(pg_db), 900)  # node_id NULL
    a, b = Repository(pg_db, node_id="node-a"), Repository(pg_db, node_id="node-b")
    a_ids = {_receive(a, n) for n in range(910, 914)}
    b_ids = {_receive(b, n) for n in range(920, 924)}
    assert {i.id for i in a.claim_received("wa", 100)} == a_ids | {legacy}
    assert b.requeue_in_progress() == 0  # A's claims (the legacy row adopted by the claim too) are not B's
    assert {i.id for i in b.claim_received("wb", 100)} == b_ids
    assert a.claim_received("wa", 100) == []
    for i in a_ids | {legacy}:
        a.record_verdict(i, make_verdict(0.2), worker="wa", source_header=b"DICM-header")
    assert a.source_headers([*a_ids, legacy]) == {i: b"DICM-header" for i in a_ids | {legacy}}
    assert a.requeue_in_progress() == 0
    assert b.requeue_in_progress() == len(b_ids)
    later = datetime.now(timezone.utc) + timedelta(seconds=5)
    assert a.ready_groups(0, now=later) == []  # series "S" waits for B's instances
    b.claim_received("wb", 100)
    for i in b_ids:
        b.record_verdict(i, make_verdict(0.9), worker="wb")
    (group,) = a.ready_groups(0, now=later)
    assert b.ready_groups(0, now=later) == [group]  # either node may build the split series
    assert set(group.instance_ids) == a_ids | b_ids | {legacy}
    kwargs = dict(group=group, sop_instance_uid="2.25.77", series_instance_uid="2.25.78", destination="PACS",
                  path="r", instance_ids=group.instance_ids, instance_count=9, suspected_count=4, max_score=0.9)
    rid = a.create_report(**kwargs)
    assert b.create_report(**kwargs) is None  # the same SR built by B too: one outbox row
    assert b.claim_due_reports() == []  # A built it, A's reports_dir has the file: A sends it
    assert [r.id for r in a.claim_due_reports()] == [rid]


def test_pg_claim_records_and_verdict_batch(pg_db: Database) -> None:
    """The claim's RETURNING rows and a batch of verdicts on PostgreSQL: the records equal a
    fresh read (timestamptz back as UTC), a second verdict for one instance in a batch is refused."""
    repo = Repository(pg_db, node_id="node-a")
    ids = [_receive(repo, n) for n in range(930, 934)]
    claimed = repo.claim_received("wa", 3)
    assert [r.id for r in claimed] == ids[:3]
    assert claimed == [repo.get_instance(i) for i in ids[:3]]
    assert all(r.claimed_at is not None and r.claimed_at.utcoffset() == timedelta(0) for r in claimed)
    items = [
        ScoredInstance(ids[0], VerdictInput.from_verdict(make_verdict(0.9)), b"h0"),
        ScoredInstance(ids[1], VerdictInput.from_verdict(make_verdict(0.1))),
        ScoredInstance(ids[0], VerdictInput.from_verdict(make_verdict(0.5))),  # twice in the batch
        ScoredInstance(ids[3], VerdictInput.from_verdict(make_verdict(0.5))),  # never claimed
    ]
    errors = repo.record_verdicts(items, worker="wa")
    assert [type(e).__name__ if e else None for e in errors] == [
        None, None, "InvalidTransitionError", "InvalidTransitionError"]
    assert [repo.get_instance(i).status for i in ids] == ["analysed", "analysed", "analysing", "received"]
    assert repo.verdicts_for(ids)[ids[0]].score == 0.9
    assert repo.source_headers([ids[0]]) == {ids[0]: b"h0"}
