"""The same claims against a throwaway PostgreSQL cluster (FOR UPDATE SKIP LOCKED path).

Skipped when the PostgreSQL server binaries or psycopg are missing. initdb refuses
to run as root, so under root the cluster runs as ``nobody`` through runuser.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

pytest.importorskip("psycopg", reason="psycopg not installed (pip install -e '.[postgres]')")

from alembic.autogenerate import compare_metadata  # noqa: E402
from alembic.runtime.migration import MigrationContext  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from storage.database import Database  # noqa: E402
from storage.models import Base  # noqa: E402
from storage.repository import Repository  # noqa: E402

from .conftest import make_verdict  # noqa: E402


def _bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists() and Path(candidate, "pg_ctl").exists():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    bindir = _bin_dir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    prefix: list[str] = []
    owner = None
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        try:
            owner = pwd.getpwnam("nobody")
        except KeyError:
            owner = None
        if runuser is None or owner is None:
            pytest.skip("running as root and cannot drop to 'nobody' (initdb refuses root)")
        prefix = [runuser, "-u", "nobody", "--"]
    # not under tmp_path: pytest's base folder is private to root, 'nobody' could not enter it
    base = Path(tempfile.mkdtemp(prefix="dski-pg-"))
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data, log = base / "data", base / "server.log"
    port = _free_port()
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}

    def run(*args: str) -> None:
        subprocess.run([*prefix, *args], check=True, cwd=base, env=env, capture_output=True, timeout=60)

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=40"
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "30", "start")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(base, ignore_errors=True)
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"cannot start a throwaway PostgreSQL cluster: {detail.decode(errors='replace')[-300:]}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        pid_file = data / "postmaster.pid"
        pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
        try:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            if pid is not None:
                os.kill(pid, 9)  # the postmaster we started, by its PID
        shutil.rmtree(base, ignore_errors=True)


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
    assert pg_db.current_revision() == "0001"
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
