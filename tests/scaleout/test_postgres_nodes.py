"""Scale-out: two real `dski serve` processes sharing one real PostgreSQL database.

The deployment of docs/scaling.md, on one machine: a throwaway PostgreSQL 15 cluster
(``tests.pgserver``; under root it runs as ``nobody``), Orthanc as the PACS, a tiny
real DSKI bundle, and two node processes with their own config file, port, spool,
reports folder and log, and the same ``storage.database_url``. dcmtk ``storescu``
plays the load balancer's part: some series go to node A, some to node B, one series
is split between both, and one instance is sent to both.

How a split series is handled (the design under test): each node scores only the
instances whose file is in its own spool (``instances.node_id``), and keeps each
source header with its verdict (``verdicts.source_header``), so whichever node
completes the series first builds the one SR from the database; the other node's
attempt gives the same deterministic SR UID and is dropped by the unique
(SR UID, destination) key. A report is sent by the node that built it (its SR file
is in that node's ``reports_dir``).

Asserted: every instance processed, none scored twice (one verdict and one
``received -> analysing`` event per instance), each node touched only its own files,
exactly one SR per series in Orthanc, one sent report row per SR UID and destination.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

pytest.importorskip("psycopg", reason="psycopg not installed (pip install -e '.[postgres]')")

from sqlalchemy import create_engine, text  # noqa: E402

from storage.spool import NODE_ID_FILE  # noqa: E402
from tests.nodeproc import (  # noqa: E402
    MODALITY_AET,
    NODE_AET,
    NodeProcess,
    RestartableOrthanc,
    build_tiny_bundle,
    finish_storescu,
    make_series,
    sop_uid,
    sr_image_refs,
    storescu_popen,
    wait_for,
)
from tests.peers import free_port, require_binary  # noqa: E402
from tests.pgserver import PostgresServer, postgres_or_skip  # noqa: E402

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    yield from postgres_or_skip(max_connections=80)


def _rows(url: str, sql: str, **params: object) -> list:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())
    finally:
        engine.dispose()


def test_two_nodes_share_one_postgresql_database(pg: PostgresServer, tmp_path: Path) -> None:
    require_binary("storescu")
    url = pg.create_database("dski_scaleout")
    bundle = build_tiny_bundle(tmp_path / "bundle")
    port_a, port_b = free_port(), free_port()
    # Orthanc accepts C-STOREs from the AE title DSKI only (both nodes use it, as behind a load balancer)
    pacs = RestartableOrthanc(tmp_path, modalities={NODE_AET: ("127.0.0.1", port_a), MODALITY_AET: ("127.0.0.1", free_port())})
    pacs.start()
    common = {
        "storage": {"database_url": url},
        # two workers per node: SKIP LOCKED claims between threads of one node as well
        "detector": {"workers": 2, "batch_size": 4},
        # long enough for the split series to be stored and scored on both nodes first
        "processing": {"series_idle_seconds": 4, "poll_interval_seconds": 0.2},
    }
    nodes = {
        "A": NodeProcess(tmp_path / "node-a", bundle, pacs=pacs, port=port_a, overrides=common),
        "B": NodeProcess(tmp_path / "node-b", bundle, pacs=pacs, port=port_b, overrides=common),
    }
    try:
        for node in nodes.values():
            node.start()
        ids = {name: (node.spool_dir / NODE_ID_FILE).read_text().strip() for name, node in nodes.items()}
        assert ids["A"] != ids["B"]

        study = pydicom.uid.generate_uid()
        data = tmp_path / "data"
        s_a = make_series(data / "a", 6, study, prefix="a")
        s_b = make_series(data / "b", 6, study, prefix="b")
        s_split = make_series(data / "split", 8, study, prefix="split")
        to_a = s_a + s_split[:4]
        to_b = s_b + s_split[4:] + [s_a[0]]  # s_a[0] also reaches B: a duplicate across nodes
        # both associations at once, as a load balancer would hand them out
        procs = [storescu_popen(nodes["A"].port, to_a), storescu_popen(nodes["B"].port, to_b)]
        outcomes = [finish_storescu(p, timeout=180) for p in procs]
        for outcome, files in zip(outcomes, (to_a, to_b)):
            assert outcome.returncode == 0, outcome.output[-2000:]
            assert sorted(outcome.acked) == sorted(files), outcome.output[-2000:]

        series = {
            "A": str(pydicom.dcmread(s_a[0]).SeriesInstanceUID),
            "B": str(pydicom.dcmread(s_b[0]).SeriesInstanceUID),
            "split": str(pydicom.dcmread(s_split[0]).SeriesInstanceUID),
        }
        sent_uids = {sop_uid(p) for p in s_a + s_b + s_split}

        def done() -> bool:
            srs = pacs.study_sr_series(study)
            sent = _rows(url, "SELECT count(*) FROM reports WHERE status = 'sent'")[0][0]
            return len(srs) == 3 and sent == 3

        try:
            wait_for(done, timeout=240, what="three SRs sent and stored in Orthanc", interval=1.0)
        except TimeoutError:
            for name, node in nodes.items():
                print(f"--- node {name} ---\n{node.log_tail(40)}")
            raise
        time.sleep(3)  # a second, late SR or a repeated send would show up here

        # -- every instance processed, each once, on the node that holds its file
        instances = _rows(url, "SELECT id, sop_instance_uid, series_instance_uid, status, node_id, spool_path FROM instances")
        assert {r.sop_instance_uid for r in instances} == sent_uids
        assert len(instances) == len(sent_uids), "the duplicate sent to B made a second row"
        assert Counter(r.status for r in instances) == {"analysed": len(sent_uids)}
        # s_a[0] went to both nodes at about the same time: whichever committed it first holds
        # it (A almost always: it is A's first object and B's last), the other logged a duplicate
        dup = sop_uid(s_a[0])
        by_series = {
            key: {r.node_id for r in instances if r.series_instance_uid == uid and r.sop_instance_uid != dup}
            for key, uid in series.items()
        }
        assert by_series == {"A": {ids["A"]}, "B": {ids["B"]}, "split": {ids["A"], ids["B"]}}
        assert {r.node_id for r in instances if r.sop_instance_uid == dup} <= {ids["A"], ids["B"]}
        for name, node in nodes.items():
            assert node.spool_files() == {r.spool_path for r in instances if r.node_id == ids[name]}, name

        verdicts = _rows(url, "SELECT instance_id, source_header IS NOT NULL AS has_header FROM verdicts")
        assert sorted(v.instance_id for v in verdicts) == sorted(r.id for r in instances)
        assert all(v.has_header for v in verdicts)
        claims = _rows(
            url,
            # a claim is received -> analysing; a duplicate arriving during analysis is logged
            # as analysing -> analysing on the same row and is no claim
            "SELECT entity_id, count(*) AS n FROM events WHERE entity = 'instance' AND from_status = 'received' "
            "AND to_status = 'analysing' GROUP BY entity_id",
        )
        assert {c.entity_id: c.n for c in claims} == {r.id: 1 for r in instances}
        workers = _rows(
            url,
            "SELECT DISTINCT i.node_id, e.detail FROM events e JOIN instances i ON i.id = e.entity_id "
            "WHERE e.entity = 'instance' AND e.from_status = 'analysing' AND e.to_status = 'analysed'",
        )
        pids = {name: str(node.proc.pid) for name, node in nodes.items()}
        for row in workers:  # the worker that scored an instance belongs to the node holding its file
            owner = "A" if row.node_id == ids["A"] else "B"
            assert f":{pids[owner]}:worker-" in row.detail, row

        # -- one report per series, each sent once, by the node that built it
        reports = _rows(
            url,
            "SELECT id, sop_instance_uid, destination, status, source_series_instance_uid, node_id, path FROM reports",
        )
        assert sorted(r.source_series_instance_uid for r in reports) == sorted(series.values())
        assert all(r.status == "sent" for r in reports)
        assert Counter((r.sop_instance_uid, r.destination) for r in reports).most_common(1)[0][1] == 1
        sends = _rows(
            url,
            "SELECT entity_id, count(*) AS n FROM events WHERE entity = 'report' AND to_status = 'sending' "
            "GROUP BY entity_id",
        )
        assert {s.entity_id: s.n for s in sends} == {r.id: 1 for r in reports}
        for r in reports:
            owner = nodes["A"] if r.node_id == ids["A"] else nodes["B"]
            assert Path(r.path).is_relative_to(owner.root), (r.path, r.node_id)

        # -- Orthanc: exactly one SR per source series, the split one covering all 8 images
        srs = pacs.study_srs(study)
        assert len(srs) == 3
        refs = {}
        for sr in srs:
            images = sr_image_refs(sr)
            (source_series,) = {r.series_instance_uid for r in instances if r.sop_instance_uid in images}
            refs[source_series] = images
        assert refs[series["split"]] == {sop_uid(p) for p in s_split}
        assert refs[series["A"]] == {sop_uid(p) for p in s_a}
        assert refs[series["B"]] == {sop_uid(p) for p in s_b}
        assert {str(sr.SOPInstanceUID) for sr in srs} == {r.sop_instance_uid for r in reports}
    finally:
        for name, node in nodes.items():
            if node.running:
                node.stop()
            print(f"--- node {name} log tail ---\n{node.log_tail(15)}")
        pacs.stop()
