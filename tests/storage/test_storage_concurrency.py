"""Claims must be exclusive: several workers (threads, engines, processes) never get one row twice."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select

from storage.database import Database
from storage.models import Event
from storage.repository import ReportGroup, Repository

from .conftest import Receive, make_verdict

N_INSTANCES = 200
N_WORKERS = 4


def _claim_all(repo: Repository, worker: str, barrier: threading.Barrier | None, out: list[int]) -> None:
    if barrier is not None:
        barrier.wait()
    while True:
        claimed = repo.claim_received(worker, 3)
        if not claimed:
            return
        out.extend(r.id for r in claimed)
        # A real worker now analyses for a while. Without a pause the SQLite busy handler's
        # back-off lets one tight loop take everything, and the test would prove no race.
        time.sleep(0.005)


def _check(db: Database, all_ids: set[int], results: list[list[int]]) -> None:
    counts = Counter(i for ids in results for i in ids)
    assert [i for i, n in counts.items() if n > 1] == []  # nobody claimed twice
    assert set(counts) == all_ids
    with db.read_session() as s:
        n_events = s.scalar(select(func.count()).select_from(Event).where(Event.to_status == "analysing"))
    assert n_events == len(all_ids)


@pytest.mark.parametrize("shared_engine", [True, False], ids=["one-engine", "engine-per-thread"])
def test_claim_race_threads_sqlite(db: Database, receive: Receive, shared_engine: bool) -> None:
    all_ids = {receive().instance_id for _ in range(N_INSTANCES)}
    barrier = threading.Barrier(N_WORKERS)
    results: list[list[int]] = [[] for _ in range(N_WORKERS)]
    dbs = [db if shared_engine else Database(db.url) for _ in range(N_WORKERS)]
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            _claim_all(Repository(dbs[k]), f"w{k}", barrier, results[k])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(N_WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    _check(db, all_ids, results)
    assert sum(1 for r in results if r) >= 2, "the race did not happen: one worker took everything"
    if not shared_engine:
        for d in dbs:
            d.dispose()


def _process_worker(url: str, worker: str, start: multiprocessing.Event, queue: multiprocessing.Queue) -> None:
    db = Database(url)
    out: list[int] = []
    try:
        start.wait(10)
        _claim_all(Repository(db), worker, None, out)
        queue.put((worker, out, None))
    except BaseException as exc:  # noqa: BLE001
        queue.put((worker, out, repr(exc)))
    finally:
        db.dispose()


def test_claim_race_processes_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'race.sqlite3'}"
    db = Database(url)
    db.migrate()
    repo = Repository(db)
    all_ids = set()
    for n in range(N_INSTANCES):
        all_ids.add(
            repo.record_received(
                sop_instance_uid=f"1.9.{n}", sop_class_uid="1.2", study_instance_uid="1.9", series_instance_uid="1.9.1",
                patient_id=None, modality=None, transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="M",
                peer_address="127.0.0.1:1", spool_path=f"x/{n}.dcm", sha256=f"{n:064x}", size_bytes=1,
            ).instance_id
        )
    db.dispose()  # no connection crosses the fork
    ctx = multiprocessing.get_context("fork")
    start, queue = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(url, f"p{k}", start, queue)) for k in range(N_WORKERS)]
    for p in procs:
        p.start()
    start.set()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    assert [r[2] for r in results] == [None] * N_WORKERS
    _check(db, all_ids, [r[1] for r in results])
    db.dispose()


def test_report_claim_race(db: Database, receive: Receive) -> None:
    repo = Repository(db)
    ids = [receive(series="S").instance_id for _ in range(2)]
    repo.claim_received("w", 10)
    for i in ids:
        repo.record_verdict(i, make_verdict())
    group = ReportGroup("1.2.3", "S", tuple(ids), datetime.now(timezone.utc), None)
    report_ids = {
        repo.create_report(group=group, sop_instance_uid=f"2.25.{n}", series_instance_uid="2.25", destination="PACS",
                           path="p", instance_ids=ids, instance_count=2, suspected_count=0, max_score=0.1)
        for n in range(40)
    }
    later = datetime.now(timezone.utc) + timedelta(seconds=1)
    results: list[list[int]] = [[] for _ in range(N_WORKERS)]
    barrier = threading.Barrier(N_WORKERS)

    def run(k: int) -> None:
        barrier.wait()
        while batch := repo.claim_due_reports(later, limit=2):
            results[k].extend(r.id for r in batch)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(N_WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed = [i for r in results for i in r]
    assert sorted(claimed) == sorted(report_ids)
