from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

from storage.database import Database
from storage.repository import Repository
from storage.spool import Spool

from .conftest import Receive


def _age(spool: Spool, rel: Path, seconds: float = 3600) -> None:
    full = spool.root / rel
    t = full.stat().st_mtime - seconds
    os.utime(full, (t, t))


def test_reconcile_quarantines_orphans_and_flags_missing_files(
    repo: Repository, receive: Receive, spool: Spool, db: Database, tmp_path: Path
) -> None:
    kept = spool.store(b"kept")
    kept_id = receive(spool_path=kept.path, sha256=kept.sha256).instance_id
    gone_analysing = spool.store(b"gone while analysing")
    gone_analysing_id = receive(spool_path=gone_analysing.path, sha256=gone_analysing.sha256).instance_id
    gone = spool.store(b"gone")
    gone_id = receive(spool_path=gone.path, sha256=gone.sha256).instance_id
    delivered = spool.store(b"delivered")
    delivered_id = receive(spool_path=delivered.path, sha256=delivered.sha256, skip_reason="non-image").instance_id
    orphan = spool.store(b"orphan: written, never committed")
    young_orphan = spool.store(b"a C-STORE between write and commit")
    assert [r.id for r in repo.claim_received("w", 2)] == [kept_id, gone_analysing_id]  # gone stays received
    for entry in (gone, gone_analysing, delivered):
        spool.delete(entry.path)
    for entry in (orphan, kept):
        _age(spool, entry.path)
    stale_temp = spool.root / orphan.path.parent / ".0123.dcm.tmp"
    stale_temp.write_bytes(b"half")
    os.utime(stale_temp, (0, 0))

    quarantine = tmp_path / "quarantine"
    result = repo.reconcile_spool(spool, quarantine)

    assert result.checked_files == 3  # kept, orphan, young_orphan
    assert result.temp_files_removed == 1 and not stale_temp.exists()
    assert [q[0] for q in result.quarantined] == [orphan.path.as_posix()]
    target = result.quarantined[0][1]
    assert target.read_bytes() == b"orphan: written, never committed"
    assert json.loads(target.with_name(target.name + ".reason.json").read_text())["source"] == orphan.path.as_posix()
    assert spool.exists(young_orphan.path)  # too young to judge
    assert spool.exists(kept.path)
    assert sorted(result.missing) == sorted([gone_id, gone_analysing_id])
    for i in (gone_id, gone_analysing_id):
        rec = repo.get_instance(i)
        assert rec.status == "failed" and rec.status_reason == "spool file missing"
    assert repo.get_instance(delivered_id).status == "skipped"  # finished rows are not touched
    assert repo.get_instance(kept_id).status == "analysing"

    from sqlalchemy import select

    from storage.models import Event

    with db.read_session() as s:
        node_events = s.scalars(select(Event).where(Event.entity == "node")).all()
        details = [json.loads(e.detail) for e in node_events]
    assert [d["event"] for d in details] == ["orphan spool file quarantined"]
    assert details[0]["path"] == orphan.path.as_posix()

    again = repo.reconcile_spool(spool, quarantine, min_age=timedelta(0))  # start-up: no grace period
    assert [q[0] for q in again.quarantined] == [young_orphan.path.as_posix()]
    assert again.missing == []
