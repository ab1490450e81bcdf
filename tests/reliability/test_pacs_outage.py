"""PACS outage: Orthanc goes away while the node has reports to send.

The PACS is stopped for real (SIGTERM; Orthanc needs ~3 s to go) and started again as a
new process on the same ports and the same storage folder. The node is the real
``dski serve`` process; its outbox is read from its SQLite database, the delivered SRs
from Orthanc's REST API, and the manual retry goes through the real ``dski`` CLI.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from listener.dispatch import backoff_delay
from tests.nodeproc import NodeProcess, RestartableOrthanc, make_series, send_tracked, wait_for

pytestmark = pytest.mark.e2e


def _ts(value: str) -> datetime:
    """A timestamp from the events table (naive UTC in SQLite) or an event's JSON detail (aware)."""
    parsed = datetime.fromisoformat(str(value).replace(" ", "T").replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _report_events(node: NodeProcess, report_id: int) -> list[dict]:
    return [
        dict(r)
        for r in node.db(
            "SELECT at, from_status, to_status, detail FROM events WHERE entity = 'report' AND entity_id = ? ORDER BY id",
            report_id,
        )
    ]


def _send_series(node: NodeProcess, tmp: Path, study_uid: str, name: str, count: int = 4) -> str:
    files = make_series(tmp / name, count, study_uid, prefix=name)
    outcome = send_tracked(node.port, files)
    assert outcome.acked == files, outcome.output
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _report_of(node: NodeProcess, series_uid: str) -> dict | None:
    rows = node.db("SELECT * FROM reports WHERE source_series_instance_uid = ?", series_uid)
    assert len(rows) <= 1
    return dict(rows[0]) if rows else None


def test_reports_wait_with_backoff_during_outage_and_are_delivered_once(
    tmp_path: Path, pacs: RestartableOrthanc, make_node
) -> None:
    initial, maximum = 0.5, 4.0
    node = make_node(
        pacs=pacs,
        overrides={
            "processing": {"series_idle_seconds": 2},
            "dispatch": {"interval_seconds": 0.5, "max_attempts": 50, "backoff_initial_seconds": initial,
                         "backoff_max_seconds": maximum, "timeout_seconds": 5},
        },
    )
    node.start()
    study_uid = generate_uid()

    # before the outage: one report delivered
    series_a = _send_series(node, tmp_path, study_uid, "a")
    wait_for(lambda: (_report_of(node, series_a) or {}).get("status") == "sent", 60, "report A delivered")
    assert len(pacs.study_sr_series(study_uid)) == 1

    # the outage
    outage_started = time.monotonic()
    pacs.stop()
    series_b = _send_series(node, tmp_path, study_uid, "b")
    series_c = _send_series(node, tmp_path, study_uid, "c")
    wait_for(
        lambda: all((_report_of(node, s) or {}).get("attempts", 0) >= 4 for s in (series_b, series_c)),
        90, "four failed attempts on reports B and C",
    )
    during = {s: _report_of(node, s) for s in (series_b, series_c)}
    for report in during.values():
        assert report["status"] in ("retrying", "sending"), report
        assert report["sent_at"] is None
        # pynetdicom reports a refused connection as an aborted association; either way it names the PACS
        assert f"ORTHANC@127.0.0.1:{pacs.dicom_port}" in (report["last_error"] or ""), report

    # backoff: each retry waited at least initial * 2^(n-1) (capped) after the n-th failure
    gaps = {}
    for series, report in during.items():
        events = _report_events(node, report["id"])
        failures = [e for e in events if e["from_status"] == "sending" and e["to_status"] == "retrying"]
        claims = [e for e in events if e["from_status"] == "retrying" and e["to_status"] == "sending"]
        assert len(failures) >= 4
        waited = []
        for n, failure in enumerate(failures[:-1], start=1):
            detail = json.loads(failure["detail"])
            assert detail["attempts"] == n
            planned = (_ts(detail["next_attempt_at"]) - _ts(failure["at"])).total_seconds()
            assert planned == pytest.approx(backoff_delay(n, initial, maximum), abs=0.25)
            retry_at = _ts(claims[n - 1]["at"])
            waited.append(round((retry_at - _ts(failure["at"])).total_seconds(), 2))
            assert waited[-1] >= backoff_delay(n, initial, maximum) - 0.05, (n, waited)
        gaps[series] = waited
    assert not node.db("SELECT id FROM reports WHERE status = 'dead'")

    # the PACS comes back: same ports, same storage folder, a new process
    pacs.restart()
    outage_s = time.monotonic() - outage_started
    back = time.monotonic()
    wait_for(
        lambda: all((_report_of(node, s) or {}).get("status") == "sent" for s in (series_b, series_c)),
        60, "reports B and C delivered after the outage",
    )
    delivered_after_s = time.monotonic() - back
    time.sleep(3.0)  # more dispatch rounds: nothing may be sent again

    reports = node.db("SELECT id, source_series_instance_uid AS series, status, attempts FROM reports")
    assert len(reports) == 3 and {r["status"] for r in reports} == {"sent"}
    for r in reports:
        events = _report_events(node, r["id"])
        assert sum(e["to_status"] == "sent" for e in events) == 1, events
        claims = sum(e["to_status"] == "sending" for e in events)
        if r["series"] == series_a:
            assert claims == 1, "report A was sent again after the outage"
    sr_series = pacs.study_sr_series(study_uid)
    assert len(sr_series) == 3, "an SR is missing in the PACS (A must survive the restart)"
    assert all(len(ids) == 1 for ids in sr_series.values()), sr_series

    summary = {
        "outage_seconds": round(outage_s, 1),
        "attempts_during_outage": {("B" if s == series_b else "C"): during[s]["attempts"] for s in during},
        "waits_between_attempts_s": {("B" if s == series_b else "C"): gaps[s] for s in gaps},
        "delivered_after_restart_s": round(delivered_after_s, 1),
        "final_attempts": {r["id"]: r["attempts"] for r in reports},
        "reports_sent": len(reports),
        "srs_in_pacs": sum(len(v) for v in sr_series.values()),
        "duplicates": sum(len(v) - 1 for v in sr_series.values()),
    }
    print("PACS-OUTAGE " + json.dumps(summary))


def test_dead_reports_are_delivered_by_outbox_retry(tmp_path: Path, pacs: RestartableOrthanc, make_node) -> None:
    node = make_node(
        pacs=pacs,
        overrides={
            "processing": {"series_idle_seconds": 2},
            "dispatch": {"interval_seconds": 0.5, "max_attempts": 3, "backoff_initial_seconds": 0.5,
                         "backoff_max_seconds": 1, "timeout_seconds": 5},
        },
    )
    node.start()
    pacs.stop()
    study_uid = generate_uid()
    series_b = _send_series(node, tmp_path, study_uid, "b", count=3)
    series_c = _send_series(node, tmp_path, study_uid, "c", count=3)
    wait_for(
        lambda: all((_report_of(node, s) or {}).get("status") == "dead" for s in (series_b, series_c)),
        60, "reports dead after max_attempts",
    )
    time.sleep(3.0)  # a dead report is not tried again by itself
    dead = [_report_of(node, s) for s in (series_b, series_c)]
    assert all(r["status"] == "dead" and r["attempts"] == 3 for r in dead), dead

    listed = node.cli("outbox", "list", "--status", "dead")
    assert listed.returncode == 0, listed.stderr
    for r in dead:
        assert r["sop_instance_uid"] in listed.stdout

    pacs.restart()
    time.sleep(3.0)  # the PACS is back, but a dead report waits for a person
    assert all(_report_of(node, s)["status"] == "dead" for s in (series_b, series_c))
    assert pacs.study_sr_series(study_uid) == {}

    for r in dead:
        retried = node.cli("outbox", "retry", str(r["id"]))
        assert retried.returncode == 0, retried.stdout + retried.stderr
        assert f"report {r['id']} queued for sending" in retried.stdout
    wait_for(
        lambda: all((_report_of(node, s) or {}).get("status") == "sent" for s in (series_b, series_c)),
        60, "retried reports delivered",
    )
    time.sleep(2.0)
    again = node.cli("outbox", "retry", str(dead[0]["id"]))
    assert again.returncode == 1 and "cannot retry" in again.stderr

    for r in dead:
        events = _report_events(node, r["id"])
        assert sum(e["to_status"] == "sent" for e in events) == 1
        assert sum(e["to_status"] == "dead" for e in events) == 1
        assert any(json.loads(e["detail"] or "{}").get("event") == "manual retry" for e in events)
    sr_series = pacs.study_sr_series(study_uid)
    assert len(sr_series) == 2 and all(len(ids) == 1 for ids in sr_series.values()), sr_series
    print("OUTBOX-RETRY " + json.dumps({"dead": len(dead), "attempts_before_dead": [r["attempts"] for r in dead],
                                        "delivered_after_retry": 2, "srs_in_pacs": 2, "duplicates": 0}))
