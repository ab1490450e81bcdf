"""Crash safety: the node is killed with SIGKILL while a study arrives and while it is processed.

The modality is dcmtk ``storescu -v``; its output says, file by file, which stores got
a success status. After every kill the node is restarted and the modality sends again
what it did not get a success for, as a modality's retry queue does. The promises:

- a store interrupted before its status is never acknowledged: whatever got a success
  status is in the database when the node dies (checked after every kill);
- after the last restart and quiescence, every acknowledged instance has exactly one
  row, exactly one verdict and is referenced by exactly one delivered SR, in the
  database and in the PACS (Orthanc's REST API); the PACS holds one SR per series;
- no spool file is left without a database row, and no temporary file survives.

Start-up reconciliation gets its own test: planted orphan files and a row whose file
is missing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.nodeproc import (
    NodeProcess,
    RestartableOrthanc,
    finish_storescu,
    make_series,
    send_tracked,
    sop_uid,
    sr_image_refs,
    storescu_popen,
    wait_for,
)

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("DSKI_CRASH_SEED", "20251127"))
SERIES = (100, 100, 100)
RECEIVE_KILLS = 3
PROCESSING_KILLS = 2  # the first at a random moment after the first report, the next ones while a report is sent
# A series is complete after this long without a new instance. It must exceed the gap
# a kill + restart (6-19 s on a loaded 2-core machine: importing torch) leaves in a series, or the node would
# rightly report a partial series and then a second, complete SR for the same images.
IDLE_SECONDS = 30.0


def acked_uids_now_of(acked: set[Path]) -> set[str]:
    return {sop_uid(p) for p in acked}


def _unacked_in_db(node: NodeProcess, acked_uids: set[str]) -> set[str]:
    in_db = {r[0] for r in node.db("SELECT sop_instance_uid FROM instances")}
    return acked_uids - in_db


@pytest.mark.slow
def test_kill9_during_receive_and_processing_loses_and_duplicates_nothing(
    tmp_path: Path, pacs: RestartableOrthanc, make_node
) -> None:
    rng = random.Random(SEED)
    study_uid = generate_uid()
    files: list[Path] = []
    for n, count in enumerate(SERIES):
        files += make_series(tmp_path / "study", count, study_uid, prefix=f"s{n}")
    uid_of = {p: sop_uid(p) for p in files}
    assert len(set(uid_of.values())) == len(files)

    node = make_node(
        pacs=pacs,
        overrides={
            "processing": {"series_idle_seconds": IDLE_SECONDS, "poll_interval_seconds": 0.2},
            "dispatch": {"interval_seconds": 0.5, "backoff_initial_seconds": 1, "backoff_max_seconds": 2},
        },
    )
    acked: set[Path] = set()
    log: list[dict] = []
    started = time.monotonic()
    node.start()

    def check_after_kill(what: str, extra: dict) -> None:
        # by construction: a success status is sent only once the object is in the
        # write-ahead journal (fsynced), which the restart applies; its row may not exist yet
        acked_uids_now = {uid_of[p] for p in acked}
        missing = _unacked_in_db(node, acked_uids_now)
        journaled = node.journaled_uids()
        assert not missing - journaled, (
            f"{len(missing - journaled)} acknowledged instances neither in the database nor in the journal "
            f"after kill ({what})"
        )
        counts = dict(node.db("SELECT status, count(*) FROM instances GROUP BY status"))
        reports = dict(node.db("SELECT status, count(*) FROM reports GROUP BY status"))
        known = {r[0] for r in node.db("SELECT spool_path FROM instances WHERE spool_path IS NOT NULL")}
        orphans = len(node.spool_files() - known)
        log.append({"kill": what, "acked": len(acked), "only_in_journal": len(missing), "instances": counts, "reports": reports,
                    "orphan_files": orphans, "temp_files": len(node.spool_temp_files()), **extra})

    # -- kills while the study arrives (the worker analyses at the same time)
    for k in range(RECEIVE_KILLS):
        pending = [p for p in files if p not in acked]
        proc = storescu_popen(node.port, pending)
        delay = rng.uniform(0.5, 4.0)
        time.sleep(delay)
        sender_done = proc.poll() is not None
        node.kill()
        outcome = finish_storescu(proc)
        acked |= set(outcome.acked)
        assert not outcome.refused, outcome.refused  # nothing but success or no answer at all
        unanswered = len(pending) - len(outcome.statuses)
        check_after_kill(f"receive-{k + 1}", {"after_s": round(delay, 2), "sent_this_round": len(outcome.acked),
                                              "unanswered": unanswered, "sender_finished": sender_done})
        restart = node.start()
        assert restart < IDLE_SECONDS - 2, f"restart took {restart:.1f}s: raise IDLE_SECONDS"
        # the restart applied the journal before opening the port: every acknowledged object has its row
        assert not _unacked_in_db(node, acked_uids_now_of(acked)), f"journal not applied at restart ({k + 1})"

    # -- the modality sends the rest
    for _ in range(3):
        pending = [p for p in files if p not in acked]
        if not pending:
            break
        outcome = send_tracked(node.port, pending)
        acked |= set(outcome.acked)
    assert acked == set(files), f"{len(files) - len(acked)} files never acknowledged"
    acked_uids = {uid_of[p] for p in acked}
    all_acked_at = time.monotonic()

    # -- kills while series are completed, SRs built and sent
    wait_for(lambda: node.db_value("SELECT count(*) FROM reports") > 0, IDLE_SECONDS + 60, "the first report")
    delay = rng.uniform(0.0, 1.5)
    time.sleep(delay)
    node.kill()
    check_after_kill("processing-1", {"after_first_report_s": round(delay, 2)})
    for k in range(1, PROCESSING_KILLS):
        # the nastiest moment for the outbox: a report on the wire (Orthanc may already hold it)
        node.start()
        t0 = time.monotonic()
        try:
            wait_for(lambda: node.db_value("SELECT count(*) FROM reports WHERE status = 'sending'"), 30,
                     "a report being sent", interval=0.02)
            seen = True
        except TimeoutError:
            seen = False
        node.kill()
        check_after_kill(f"processing-{k + 1}", {"while_sending": seen, "after_restart_s": round(time.monotonic() - t0, 2)})
    node.start()

    # -- quiescence: every series reported and delivered, nothing in flight
    def quiet() -> bool:
        busy = node.db_value("SELECT count(*) FROM instances WHERE status IN ('received', 'analysing')")
        unsent = node.db_value("SELECT count(*) FROM reports WHERE status != 'sent'")
        sent = node.db_value("SELECT count(*) FROM reports WHERE status = 'sent'")
        return busy == 0 and unsent == 0 and sent >= len(SERIES)

    wait_for(quiet, 120, "all reports delivered")
    time.sleep(3.0)  # a few more dispatch and completion rounds: nothing new may appear
    assert quiet()
    total_s = time.monotonic() - started

    # -- the database: one row, one verdict, one delivered SR per acknowledged instance
    rows = node.db(
        "SELECT i.sop_instance_uid AS uid, i.status, count(DISTINCT v.id) AS verdicts "
        "FROM instances i LEFT JOIN verdicts v ON v.instance_id = i.id GROUP BY i.id"
    )
    per_uid = Counter(r["uid"] for r in rows)
    assert set(per_uid) == acked_uids
    assert max(per_uid.values()) == 1, "an instance has several rows"
    assert {r["status"] for r in rows} == {"analysed"}, Counter(r["status"] for r in rows)
    assert all(r["verdicts"] == 1 for r in rows)
    links = node.db(
        "SELECT i.sop_instance_uid AS uid, count(*) AS n FROM instances i "
        "JOIN report_instances ri ON ri.instance_id = i.id JOIN reports r ON r.id = ri.report_id "
        "WHERE r.status = 'sent' GROUP BY i.id"
    )
    assert {r["uid"] for r in links} == acked_uids
    assert all(r["n"] == 1 for r in links), "an instance is in several delivered reports"
    reports = node.db("SELECT id, sop_instance_uid, series_instance_uid, status FROM reports")
    assert len(reports) == len(SERIES)

    # -- the PACS: one SR series per source series, one SR in each, every image referenced once
    sr_series = pacs.study_sr_series(study_uid)
    assert len(sr_series) == len(SERIES)
    assert all(len(ids) == 1 for ids in sr_series.values()), {k: len(v) for k, v in sr_series.items()}
    srs = pacs.study_srs(study_uid)
    assert {str(sr.SOPInstanceUID) for sr in srs} == {r["sop_instance_uid"] for r in reports}
    referenced = Counter(uid for sr in srs for uid in sr_image_refs(sr))
    assert set(referenced) == acked_uids
    assert set(referenced.values()) == {1}

    # -- the spool: no orphan, no temporary file
    known = {r[0] for r in node.db("SELECT spool_path FROM instances WHERE spool_path IS NOT NULL")}
    assert node.spool_files() == known
    assert node.spool_temp_files() == []

    events = dict(
        node.db(
            "SELECT json_extract(detail, '$.event') AS e, count(*) FROM events "
            "WHERE json_extract(detail, '$.event') IS NOT NULL GROUP BY e"
        )
    )
    resends = node.db_value(
        "SELECT count(*) FROM events WHERE entity = 'report' AND from_status = 'sending' AND to_status = 'pending'"
    )
    quarantined = sum(1 for _ in node.quarantine_dir.rglob("*.dcm")) if node.quarantine_dir.exists() else 0
    summary = {
        "seed": SEED,
        "kills": node.kills,
        "starts": node.starts,
        "restart_seconds": [round(s, 1) for s in node.start_seconds],
        "acknowledged": len(acked_uids),
        "instances": len(rows),
        "verdicts": sum(r["verdicts"] for r in rows),
        "reports_sent": len(reports),
        "srs_in_pacs": sum(len(v) for v in sr_series.values()),
        "duplicate_srs": sum(len(v) - 1 for v in sr_series.values()),
        "reports_resent_after_kill": resends,
        "orphans_quarantined": quarantined,
        "events": events,
        "kill_log": log,
        "seconds_total": round(total_s, 1),
        "seconds_after_last_ack": round(time.monotonic() - all_acked_at, 1),
    }
    print("CRASH-SAFETY " + json.dumps(summary))
    (tmp_path / "crash-summary.json").write_text(json.dumps(summary, indent=1))
    # the kill schedule must have hit something: at least one kill while stores were unanswered
    assert any(entry.get("unanswered", 0) > 0 for entry in log), log


def test_startup_reconciles_spool_and_database(tmp_path: Path, make_node) -> None:
    """Planted leftovers of a crash: an orphan spool file (bytes written, row never committed),
    a half-written temporary file, and a row whose spool file is gone. One start fixes all three."""
    from storage.database import Database
    from storage.repository import Repository

    node: NodeProcess = make_node()
    study_uid = generate_uid()
    orphan_src, gone_src, live = make_series(tmp_path / "objs", 3, study_uid)

    # the database as a crashed node leaves it: a committed row whose file is missing
    db = Database(node.database_url)
    db.migrate()
    repo = Repository(db)
    gone_rel = f"2025/01/01/{uuid.uuid4().hex}.dcm"
    missing = repo.record_received(
        sop_instance_uid=sop_uid(gone_src), sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=study_uid, series_instance_uid="1.2.3", patient_id="REL-1", modality="CT",
        transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="STORESCU", peer_address="127.0.0.1:1",
        spool_path=gone_rel, sha256="0" * 64, size_bytes=1,
    )
    db.dispose()
    # an orphan written just now (a crash between write and commit) and a temporary file
    folder = node.spool_dir / time.strftime("%Y/%m/%d", time.gmtime())
    folder.mkdir(parents=True, exist_ok=True)
    orphan = folder / f"{uuid.uuid4().hex}.dcm"
    shutil.copyfile(orphan_src, orphan)
    temp = folder / f".{uuid.uuid4().hex}.dcm.tmp"
    temp.write_bytes(orphan_src.read_bytes()[:1000])

    node.start()

    assert not orphan.exists(), "orphan spool file left in the spool"
    moved = list(node.quarantine_dir.rglob(orphan.name))
    assert len(moved) == 1
    note = json.loads(moved[0].with_name(moved[0].name + ".reason.json").read_text())
    assert "never acknowledged" in note["reason"]
    assert not temp.exists(), "temporary file of an interrupted write left in the spool"
    quarantine_events = node.db(
        "SELECT detail FROM events WHERE entity = 'node' AND json_extract(detail, '$.event') = 'orphan spool file quarantined'"
    )
    assert len(quarantine_events) == 1
    assert json.loads(quarantine_events[0]["detail"])["path"].endswith(orphan.name)

    (row,) = node.db("SELECT status, status_reason FROM instances WHERE id = ?", missing.instance_id)
    assert (row["status"], row["status_reason"]) == ("failed", "spool file missing")
    flagged = node.db(
        "SELECT from_status, to_status, detail FROM events WHERE entity = 'instance' AND entity_id = ? AND to_status = 'failed'",
        missing.instance_id,
    )
    assert len(flagged) == 1 and json.loads(flagged[0]["detail"])["path"] == gone_rel

    # and the node serves: a new store is acknowledged and lands in the spool
    outcome = send_tracked(node.port, [live])
    assert outcome.acked == [live], outcome.output
    print(
        "RECONCILE "
        + json.dumps({"quarantined": len(moved), "missing_flagged": len(flagged), "temp_removed": int(not temp.exists())})
    )


def test_startup_applies_a_journal_left_by_a_crash(tmp_path: Path, make_node) -> None:
    """Objects a killed receiver acknowledged from its journal, before their rows were
    written, are in the spool and database once the node is back, before it listens."""
    from storage.database import Database
    from storage.errors import DatabaseUnavailableError
    from storage.journal_apply import JournaledStore, JournalSettings, journal_entry
    from storage.spool import Spool

    node: NodeProcess = make_node()
    files = make_series(tmp_path / "objs", 3, generate_uid())
    db = Database(node.database_url)
    db.migrate()

    class _Down:  # the receiver died before any row was written
        def record_received_batch(self, objects):
            raise DatabaseUnavailableError(node.database_url, "the receiver was killed first")

    spool = Spool(node.spool_dir, 0)
    settings = JournalSettings(directory=node.spool_dir / ".journal" / "receiver-1", segment_bytes=1 << 20,
                               max_backlog_bytes=1 << 30, quarantine_dir=node.quarantine_dir)
    journal = JournaledStore(settings, spool, _Down())  # type: ignore[arg-type]
    journal.open()
    for path in files:
        data = path.read_bytes()
        journal.store(journal_entry(
            sop_instance_uid=sop_uid(path), sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.4", patient_id="REL-2", modality="CT",
            transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae="STORESCU", peer_address="127.0.0.1",
            spool_path=journal.plan(len(data)).as_posix(), status="received", reason=None, kind="image",
        ), data)
    with journal._cond:  # SIGKILL: the applier thread ends, the journal is never closed
        journal._stopping = True
        journal._cond.notify_all()
    journal._thread.join(10)
    db.dispose()
    assert node.journaled_uids() == {sop_uid(p) for p in files}

    node.start()

    rows = node.db("SELECT sop_instance_uid, spool_path, sha256 FROM instances")
    assert {r["sop_instance_uid"] for r in rows} == {sop_uid(p) for p in files}
    by_uid = {sop_uid(p): p for p in files}
    for row in rows:
        stored = (node.spool_dir / row["spool_path"]).read_bytes()
        assert stored == by_uid[row["sop_instance_uid"]].read_bytes()
    assert node.journaled_uids() == set()
    assert "journals applied at start-up" in node.log_text()
