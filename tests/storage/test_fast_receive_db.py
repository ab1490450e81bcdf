"""``Repository.record_received_batch`` (driver-level statements) against
``record_received_batch_reference`` (the SQLAlchemy session path it replaced).

Both are run on twin databases with the same objects and the same clock; the rows of
``instances`` and ``events`` and the results must be identical, duplicates included
(committed earlier, and two copies within one batch). On SQLite always, on PostgreSQL
when a server can be started (as tests/storage/test_storage_postgres.py does).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from storage.database import Database
from storage.errors import DatabaseUnavailableError
from storage.repository import ReceivedObject, ReceiveResult, Repository

_T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


def _clock() -> Callable[[], datetime]:
    ticks = itertools.count()
    return lambda: _T0 + timedelta(seconds=next(ticks))


def _obj(n: int, *, data: int | None = None, **overrides: Any) -> ReceivedObject:
    fields: dict[str, Any] = dict(
        sop_instance_uid=f"1.2.3.{n}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.1",
        patient_id="P1",
        modality="CT",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        calling_ae="MODALITY",
        peer_address="127.0.0.1:40000",
        spool_path=f"2025/03/01/{n:08x}.dcm",
        sha256=f"{(n if data is None else data):064x}",
        size_bytes=1000 + n,
    )
    fields.update(overrides)
    return ReceivedObject(**fields)


def _batches() -> list[list[ReceivedObject]]:
    return [
        [_obj(1)],
        [_obj(2), _obj(3, status="skipped", reason="non-image SOP class (x)")],
        [_obj(1, spool_path="2025/03/01/again.dcm")],  # duplicate of a committed row
        [_obj(4), _obj(4, spool_path="2025/03/01/twin.dcm"), _obj(5)],  # two copies in one batch
        [_obj(2, data=99)],  # same UID, other bytes: a new row
        [_obj(6, patient_id=None, modality=None, received_at=datetime(2025, 1, 1, 13, tzinfo=timezone(timedelta(hours=1))))],
        [_obj(7, spool_path=Path("2025/03/01//seven.dcm"), status="failed", reason="x" * 5000)],
    ]


def _dump(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    with db.engine.connect() as conn:
        return {
            table: [tuple(r) for r in conn.execute(text(f"SELECT * FROM {table} ORDER BY id"))]
            for table in ("instances", "events")
        }


def _run(db: Database, *, reference: bool, node_id: str | None) -> tuple[list[list[ReceiveResult]], dict[str, Any]]:
    repo = Repository(db, clock=_clock(), node_id=node_id)
    record = repo.record_received_batch_reference if reference else repo.record_received_batch
    results = [record(batch) for batch in _batches()]
    assert record([]) == []
    return results, _dump(db)


def _check_equivalent(make_db: Callable[[], Database]) -> None:
    for node_id in (None, "node-a"):
        fast_db, ref_db = make_db(), make_db()
        fast, ref = _run(fast_db, reference=False, node_id=node_id), _run(ref_db, reference=True, node_id=node_id)
        assert fast[0] == ref[0]
        assert fast[1] == ref[1]
        flat = [r for batch in fast[0] for r in batch]
        assert [r.duplicate for r in flat] == [False, False, False, True, False, True, False, False, False, False]
        assert flat[4].instance_id == flat[5].instance_id  # the twin names the row inserted just before it
        assert Repository(fast_db).get_instance(flat[0].instance_id).received_at == _T0


def test_sqlite_rows_and_events_equal_the_reference(tmp_path: Path) -> None:
    names = itertools.count()

    def make_db() -> Database:
        db = Database(f"sqlite:///{tmp_path / f'db{next(names)}.sqlite3'}")
        db.migrate()
        return db

    _check_equivalent(make_db)


def test_naive_received_at_fails_before_anything_is_written(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    db.migrate()
    repo = Repository(db)
    with pytest.raises(ValueError, match="naive"):
        repo.record_received_batch([_obj(1), _obj(2, received_at=datetime(2025, 1, 1))])
    assert _dump(db) == {"instances": [], "events": []}


def test_a_failing_statement_rolls_back_the_whole_batch(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    db.migrate()
    repo = Repository(db)
    # the second object of the batch fails inside the database, after the first was inserted
    with db.engine.begin() as conn:
        conn.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON instances WHEN NEW.sop_instance_uid = '1.2.3.2' "
                          "BEGIN SELECT RAISE(ABORT, 'refused'); END"))
    with pytest.raises(Exception) as info:
        repo.record_received_batch([_obj(1), _obj(2)])
    assert not isinstance(info.value, DatabaseUnavailableError)
    assert type(info.value).__module__.startswith("sqlalchemy")  # translated as Connection.execute does
    assert _dump(db) == {"instances": [], "events": []}
    assert repo.record_received_batch([_obj(1)])[0].duplicate is False  # the connection is usable again


def test_locked_database_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.database as database_module

    monkeypatch.setattr(database_module, "BUSY_TIMEOUT_MS", 200)
    url = f"sqlite:///{tmp_path / 'locked.sqlite3'}"
    a, b = Database(url), Database(url)
    a.migrate()
    try:
        with a.session() as s:
            s.execute(text("SELECT 1"))  # BEGIN IMMEDIATE: holds the write lock
            with pytest.raises(DatabaseUnavailableError, match="locked"):
                Repository(b).record_received_batch([_obj(1)])
        assert Repository(b).record_received_batch([_obj(1)])[0].duplicate is False
    finally:
        a.dispose()
        b.dispose()


def test_unreachable_database_is_unavailable(tmp_path: Path) -> None:
    folder = tmp_path / "a-folder-not-a-file"
    folder.mkdir()
    with pytest.raises(DatabaseUnavailableError):
        Repository(Database(f"sqlite:///{folder}")).record_received_batch([_obj(1)])


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install -e '.[postgres]')")
    from tests.pgserver import postgres_or_skip

    for server in postgres_or_skip(max_connections=40):
        yield server.url()


def test_postgresql_rows_and_events_equal_the_reference(pg_url: str) -> None:
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    created: list[Database] = []
    names = itertools.count()

    def make_db() -> Database:
        name = f"dski_fast_{os.getpid()}_{next(names)}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        db = Database(pg_url.rsplit("/", 1)[0] + "/" + name)
        db.migrate()
        created.append(db)
        return db

    try:
        _check_equivalent(make_db)
    finally:
        for db in created:
            name = db.engine.url.database
            db.dispose()
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
