"""The write-ahead receive journal (``storage.journal``) and its applier (``storage.journal_apply``).

The segment files are real files; the applier runs against the real spool and a real
SQLite database. Crashes are simulated by dropping a journal without closing it and
opening its directory again, which is what a new process after SIGKILL finds (the
end-to-end version is ``tests/reliability/test_crash_safety.py``).
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from storage.database import Database
from storage.errors import DatabaseUnavailableError, SpoolFullError
from storage.journal import (
    SPARE_NAME,
    JournalRecord,
    ReceiveJournal,
    journal_records,
    read_records,
)
from storage.journal_apply import (
    JournaledStore,
    JournalEntry,
    JournalSettings,
    decode_meta,
    journal_entry,
)
from storage.repository import Repository
from storage.spool import Spool

SEGMENT = 64 * 1024  # the smallest allowed: rolls after a few records


def _journal(directory: Path, sink: list[JournalRecord] | None = None, segment: int = SEGMENT) -> ReceiveJournal:
    return ReceiveJournal(directory, segment_bytes=segment, on_durable=sink.append if sink is not None else lambda r: None)


def _segments(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.seg") if p.name != SPARE_NAME)


def _all_records(directory: Path) -> list[JournalRecord]:
    return journal_records(directory)


# --------------------------------------------------------------------------- the journal alone


def test_appended_records_are_recovered_in_order_across_segments(tmp_path: Path) -> None:
    durable: list[JournalRecord] = []
    journal = _journal(tmp_path / "j", durable)
    assert journal.recover() == []
    journal.start()
    blobs = [os.urandom(9000 + i) for i in range(20)]  # about 7 per segment
    for i, blob in enumerate(blobs):
        journal.append(f"meta-{i}".encode(), blob)
    assert [r.data for r in durable] == blobs  # on_durable saw each, in order here (one thread)
    assert len(_segments(tmp_path / "j")) >= 3
    # a crash: the journal is dropped without close(); a new one finds every record
    again = _journal(tmp_path / "j")
    recovered = again.recover()
    assert [r.meta for r in recovered] == [f"meta-{i}".encode() for i in range(20)]
    assert [r.data for r in recovered] == blobs


def test_applied_segments_are_recycled_and_their_old_records_never_read_again(tmp_path: Path) -> None:
    durable: list[JournalRecord] = []
    journal = _journal(tmp_path / "j", durable)
    journal.recover()
    journal.start()
    for _ in range(20):
        journal.append(b"old", os.urandom(9000))
    for record in durable:
        journal.applied(record)
    assert journal.pending_bytes == 0
    # only the current segment is left, plus the spare made from a freed one
    assert len(_segments(tmp_path / "j")) == 1
    assert (tmp_path / "j" / SPARE_NAME).exists()
    still_current = sum(1 for r in durable if r.segment == durable[-1].segment)
    durable.clear()
    for _ in range(10):  # rolls into the recycled spare, which still holds old records
        journal.append(b"new", os.urandom(9000))
    assert len({r.segment for r in durable}) >= 2
    recovered = _journal(tmp_path / "j").recover()
    # the current segment's applied records are read again (the applier skips them by
    # their rows); nothing of the recycled file's earlier use is
    assert [r.meta for r in recovered] == [b"old"] * still_current + [b"new"] * 10


def test_a_torn_last_record_ends_the_journal_and_earlier_ones_survive(tmp_path: Path) -> None:
    journal = _journal(tmp_path / "j")
    journal.recover()
    journal.start()
    for i in range(3):
        journal.append(f"m{i}".encode(), os.urandom(5000))
    (segment,) = _segments(tmp_path / "j")
    records = list(read_records(segment, int(segment.stem, 16)))
    last = records[-1]
    # a crash in the middle of the last write: its second half never reached the disk
    with open(segment, "r+b") as fh:
        fh.seek(last.offset + last.size // 2)
        fh.write(bytes(last.size - last.size // 2))
    recovered = _journal(tmp_path / "j").recover()
    assert [r.meta for r in recovered] == [b"m0", b"m1"]


def test_a_corrupted_record_ends_the_journal_where_it_lies(tmp_path: Path) -> None:
    journal = _journal(tmp_path / "j")
    journal.recover()
    journal.start()
    for i in range(3):
        journal.append(f"m{i}".encode(), os.urandom(5000))
    (segment,) = _segments(tmp_path / "j")
    second = list(read_records(segment, int(segment.stem, 16)))[1]
    with open(segment, "r+b") as fh:  # one flipped byte inside the second record's data
        fh.seek(second.offset + second.size - 10)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert [r.meta for r in _journal(tmp_path / "j").recover()] == [b"m0"]


def test_concurrent_appends_are_all_durable_and_whole(tmp_path: Path) -> None:
    journal = _journal(tmp_path / "j", segment=1024 * 1024)
    journal.recover()
    journal.start()
    sent: dict[bytes, bytes] = {}
    lock = threading.Lock()

    def sender(t: int) -> None:
        for i in range(40):
            meta, data = f"{t}-{i}".encode(), os.urandom(3000 + t * 7 + i)
            journal.append(meta, data)
            with lock:
                sent[meta] = data

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recovered = _journal(tmp_path / "j").recover()
    assert {r.meta: r.data for r in recovered} == sent


def test_append_before_recover_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="recover"):
        _journal(tmp_path / "j").append(b"m", b"d")


def test_no_room_for_a_segment_is_a_spool_full_error_and_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    journal = _journal(tmp_path / "j")
    journal.recover()
    real_write = os.write

    def full(fd: int, data: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(SpoolFullError):
        journal.start()
    monkeypatch.setattr(os, "write", real_write)
    assert list((tmp_path / "j").iterdir()) == []


def test_segment_smaller_than_64_kib_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="64 KiB"):
        ReceiveJournal(tmp_path, segment_bytes=4096, on_durable=lambda r: None)


# --------------------------------------------------------------------------- the applier


def _crash(store: JournaledStore) -> None:
    """What SIGKILL leaves: the applier thread gone, the journal never closed (its segments
    as they are on disk). Only the thread is ended, so that it cannot act later."""
    with store._cond:
        store._stopping = True
        store._cond.notify_all()
    store._thread.join(10)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db" / "dski.sqlite3"


@pytest.fixture
def database(db_path: Path):
    db = Database(f"sqlite:///{db_path}")
    db.migrate()
    yield db
    db.dispose()


def _settings(tmp_path: Path, **kw: Any) -> JournalSettings:
    values = {"directory": tmp_path / "spool" / ".journal" / "t", "segment_bytes": 256 * 1024,
              "max_backlog_bytes": 64 * 1024 * 1024, "quarantine_dir": tmp_path / "quarantine"}
    values.update(kw)
    return JournalSettings(**values)


def _entry(store: JournaledStore, uid: str, size: int, status: str = "received") -> JournalEntry:
    return journal_entry(
        sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4", patient_id="P1", modality="CT",
        transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="MODALITY", peer_address="127.0.0.1",
        spool_path=store.plan(size).as_posix(), status=status,
        reason=None if status == "received" else "not an image", kind="image",
    )


def _rows(db_path: Path) -> list[sqlite3.Row]:
    con = sqlite3.connect(db_path)
    con.row_factory = sqlite3.Row
    try:
        return con.execute("SELECT * FROM instances ORDER BY id").fetchall()
    finally:
        con.close()


def test_stored_objects_become_spool_files_and_rows(tmp_path: Path, database: Database, db_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    stored = threading.Event()
    store = JournaledStore(_settings(tmp_path), spool, Repository(database), on_stored=stored.set)
    store.open()
    blobs = {f"1.2.3.4.{i}": os.urandom(20000 + i) for i in range(30)}
    entries = {}
    for uid, blob in blobs.items():
        entries[uid] = _entry(store, uid, len(blob))
        store.store(entries[uid], blob)
    assert store.wait_applied(10)
    store.close()
    assert stored.is_set()
    rows = {r["sop_instance_uid"]: r for r in _rows(db_path)}
    assert set(rows) == set(blobs)
    for uid, blob in blobs.items():
        row = rows[uid]
        assert row["spool_path"] == entries[uid].spool_path
        assert (spool.root / row["spool_path"]).read_bytes() == blob
        assert row["sha256"] == hashlib.sha256(blob).hexdigest() and row["size_bytes"] == len(blob)
        # the time of receipt is the journal's, not the time the row was written
        at = datetime.fromisoformat(entries[uid].received_at)
        assert datetime.fromisoformat(row["received_at"]).replace(tzinfo=at.tzinfo) == at
    assert store.refusal(1000) is None


class _Switchable:
    """A repository whose record_received_batch fails while ``down`` is set (database
    unavailable), or for one SOP Instance UID (an object that cannot be recorded)."""

    def __init__(self, repo: Repository, *, poison: str | None = None) -> None:
        self.repo = repo
        self.down = threading.Event()
        self.hold = threading.Event()  # while set, commits wait (a slow database)
        self.poison = poison
        self.calls = 0

    def record_received_batch(self, objects):
        self.calls += 1
        while self.hold.is_set():
            threading.Event().wait(0.01)
        if self.down.is_set():
            raise DatabaseUnavailableError("sqlite:///x", "database is locked")
        if self.poison is not None and any(o.sop_instance_uid == self.poison for o in objects):
            raise ValueError(f"cannot record {self.poison}")
        return self.repo.record_received_batch(objects)

    def recorded_receipts(self, receipts):
        return self.repo.recorded_receipts(receipts)


def _opened_with_database_down(tmp_path: Path, database: Database) -> tuple[Spool, _Switchable, JournaledStore]:
    """A journaled store whose commits fail until ``repo.down`` is cleared: nothing gets applied."""
    spool = Spool(tmp_path / "spool", 0)
    repo = _Switchable(Repository(database))
    repo.down.set()
    store = JournaledStore(_settings(tmp_path), spool, repo)  # type: ignore[arg-type]
    store.open()
    return spool, repo, store


def test_database_down_keeps_the_objects_refuses_new_ones_and_catches_up(
    tmp_path: Path, database: Database, db_path: Path
) -> None:
    spool, repo, store = _opened_with_database_down(tmp_path, database)
    blob = os.urandom(10000)
    store.store(_entry(store, "1.2.9.1", len(blob)), blob)  # durable in the journal: acknowledged
    deadline = 100
    while store.refusal(len(blob)) is None and deadline:
        threading.Event().wait(0.05)
        deadline -= 1
    assert store.refusal(len(blob)) == "database unavailable"
    assert _rows(db_path) == []
    assert list(spool.iter_files()) == []  # the failed batch's file was removed again
    repo.down.clear()
    assert store.wait_applied(10)
    assert store.refusal(len(blob)) is None
    store.close()
    (row,) = _rows(db_path)
    assert row["sop_instance_uid"] == "1.2.9.1"
    assert (spool.root / row["spool_path"]).read_bytes() == blob


def test_backlog_over_the_limit_is_refused(tmp_path: Path, database: Database) -> None:
    spool = Spool(tmp_path / "spool", 0)
    repo = _Switchable(Repository(database))
    repo.hold.set()  # commits wait: the object stays in the backlog, and nothing has failed
    store = JournaledStore(_settings(tmp_path, max_backlog_bytes=50_000), spool, repo)  # type: ignore[arg-type]
    store.open()
    assert store.refusal(30_000) is None
    blob = os.urandom(30_000)
    store.store(_entry(store, "1.2.9.2", len(blob)), blob)
    assert store.refusal(30_000) == "journal backlog full"
    assert store.refusal(10_000) is None  # what still fits under the limit is taken
    repo.hold.clear()
    assert store.wait_applied(10)
    assert store.refusal(30_000) is None
    store.close()


def test_an_object_that_cannot_be_recorded_is_quarantined_and_does_not_block_the_others(
    tmp_path: Path, database: Database, db_path: Path
) -> None:
    spool = Spool(tmp_path / "spool", 0)
    repo = _Switchable(Repository(database), poison="1.2.9.13")
    store = JournaledStore(_settings(tmp_path), spool, repo)  # type: ignore[arg-type]
    store.open()
    uids = [f"1.2.9.1{i}" for i in range(6)]
    for uid in uids:
        blob = os.urandom(8000)
        store.store(_entry(store, uid, len(blob)), blob)
    assert store.wait_applied(10)
    assert {r["sop_instance_uid"] for r in _rows(db_path)} == set(uids) - {"1.2.9.13"}
    quarantined = list((tmp_path / "quarantine").rglob("*.dcm"))
    assert len(quarantined) == 1
    note = quarantined[0].with_name(quarantined[0].name + ".reason.json").read_text()
    assert "cannot record 1.2.9.13" in note
    store.close()


def test_a_crash_before_applying_loses_nothing(tmp_path: Path, database: Database, db_path: Path) -> None:
    spool, _, store = _opened_with_database_down(tmp_path, database)  # nothing gets applied before the crash
    blobs = {f"1.2.8.{i}": os.urandom(15000) for i in range(12)}
    for uid, blob in blobs.items():
        store.store(_entry(store, uid, len(blob)), blob)
    # SIGKILL: the thread and the open journal are simply gone (no close)
    _crash(store)
    after = JournaledStore(_settings(tmp_path), spool, Repository(database))
    assert after.apply_leftovers() == len(blobs)
    rows = {r["sop_instance_uid"]: r for r in _rows(db_path)}
    assert set(rows) == set(blobs)
    for uid, blob in blobs.items():
        assert (spool.root / rows[uid]["spool_path"]).read_bytes() == blob
    assert _all_records(_settings(tmp_path).directory) == []  # the journal is empty again


def test_records_applied_before_a_crash_are_not_recorded_again(
    tmp_path: Path, database: Database, db_path: Path
) -> None:
    spool = Spool(tmp_path / "spool", 0)
    store = JournaledStore(_settings(tmp_path), spool, Repository(database))
    store.open()
    blob = os.urandom(12000)
    first = _entry(store, "1.2.7.1", len(blob))
    store.store(first, blob)
    # the same object again later: a real duplicate, which gets its own event
    store.store(_entry(store, "1.2.7.1", len(blob)), blob)
    assert store.wait_applied(10)
    _crash(store)  # the current segment still holds both records
    assert len(_all_records(_settings(tmp_path).directory)) == 2
    events_before = _count(db_path, "SELECT count(*) FROM events")
    after = JournaledStore(_settings(tmp_path), spool, Repository(database))
    assert after.apply_leftovers() == 2
    (row,) = _rows(db_path)
    assert row["spool_path"] == first.spool_path
    assert (spool.root / row["spool_path"]).read_bytes() == blob
    assert _count(db_path, "SELECT count(*) FROM events") == events_before  # nothing recorded twice
    assert sorted(spool.iter_files()) == [Path(first.spool_path)]


def test_a_file_cut_short_by_a_crash_is_written_whole_again(tmp_path: Path, database: Database, db_path: Path) -> None:
    spool, _, store = _opened_with_database_down(tmp_path, database)
    blob = os.urandom(30000)
    entry = _entry(store, "1.2.6.1", len(blob))
    store.store(entry, blob)
    _crash(store)
    # the applier had begun the file when the process died
    target = spool.root / entry.spool_path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(blob[:1000])
    JournaledStore(_settings(tmp_path), spool, Repository(database)).apply_leftovers()
    (row,) = _rows(db_path)
    assert target.read_bytes() == blob and row["sha256"] == hashlib.sha256(blob).hexdigest()


def test_a_full_disk_while_journaling_is_a_spool_full_error(tmp_path: Path, database: Database, monkeypatch) -> None:
    spool = Spool(tmp_path / "spool", 0)
    store = JournaledStore(_settings(tmp_path), spool, Repository(database))
    store.open()
    real_pwrite = os.pwrite

    def full(fd: int, data: Any, offset: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(SpoolFullError):
        store.store(_entry(store, "1.2.5.1", 100), b"x" * 100)
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    store.close()


def test_meta_round_trip() -> None:
    entry = JournalEntry(
        sop_instance_uid="1.2", sop_class_uid="1.3", study_instance_uid="1.4", series_instance_uid="1.5",
        patient_id=None, modality="CT", transfer_syntax_uid="1.2.840.10008.1.2", calling_ae="A É",
        peer_address="::1", spool_path="2026/11/28/x.dcm", status="skipped", reason="own report",
        received_at="2026-11-28T08:00:00.123456+00:00", kind="report",
    )
    from storage.journal_apply import encode_meta

    assert decode_meta(encode_meta(entry)) == entry


def _count(db_path: Path, sql: str) -> int:
    con = sqlite3.connect(db_path)
    try:
        return con.execute(sql).fetchone()[0]
    finally:
        con.close()


@pytest.mark.parametrize("path", ["../../etc/passwd", "2026/11/28/../../../x.dcm", "/abs/2026/11/28/" + "a" * 32 + ".dcm",
                                  "2026/11/28/" + "A" * 32 + ".dcm"])
def test_write_planned_takes_only_paths_plan_makes(tmp_path: Path, path: str) -> None:
    from storage.errors import SpoolPathError

    spool = Spool(tmp_path / "spool", 0)
    with pytest.raises(SpoolPathError):
        spool.write_planned(path, b"x")
    planned = spool.plan(1)
    entry = spool.write_planned(planned, b"x")
    spool.sync_filesystem()
    assert entry.path == planned and (spool.root / planned).read_bytes() == b"x"


def test_a_record_naming_a_foreign_path_is_set_aside_and_the_others_applied(
    tmp_path: Path, database: Database, db_path: Path
) -> None:
    spool, _, store = _opened_with_database_down(tmp_path, database)
    good = os.urandom(5000)
    store.store(_entry(store, "1.2.4.1", len(good)), good)
    bad = _entry(store, "1.2.4.2", 10)
    store.store(JournalEntry(**{**vars(bad), "spool_path": "../../etc/cron.d/x"}), b"0123456789")
    _crash(store)
    assert JournaledStore(_settings(tmp_path), spool, Repository(database)).apply_leftovers() == 2
    assert [r["sop_instance_uid"] for r in _rows(db_path)] == ["1.2.4.1"]
    (aside,) = (tmp_path / "quarantine").rglob("journal-*.bin")
    assert aside.read_bytes().endswith(b"0123456789")
    assert "not planned" in aside.with_name(aside.name + ".reason.json").read_text()
    assert not (tmp_path / "etc").exists()
    assert _all_records(_settings(tmp_path).directory) == []
