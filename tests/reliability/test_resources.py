"""Resources: the spool's filesystem fills up, the log database is locked by another process.

Both faults are real: the spool lives on a small tmpfs mounted for the test and filled
with filler files (bytes, or inodes); the database lock is an ``BEGIN EXCLUSIVE`` transaction held by the
test process on the node's SQLite file, longer than the node's busy timeout (set
short with the ``?timeout=`` URL parameter). The modality is dcmtk ``storescu``; the
node is the real ``dski serve`` process. The promises: out of resources (0xA700) on
the wire, never a success for an object that is not durably stored (in the spool, or in
the write-ahead journal when its row must wait), no orphan spool file, and the node
takes stores again once the resource is back, without a restart.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.nodeproc import NodeProcess, make_series, send_tracked, sop_uid, wait_for

pytestmark = pytest.mark.e2e

# storescu -v prints the status text of dcmtk's DU_cstoreStatusString for 0xA700
OUT_OF_RESOURCES = "Refused: OutOfResources"


def _mount_small_fs(mnt: Path, options: str) -> None:
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {mounted.stderr.strip()}")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of its own (1 MiB, few inodes), so that filling it touches nothing else on the machine.
    Requested before ``make_node``, so it is unmounted after the node has stopped."""
    mnt = tmp_path / "spoolfs"
    _mount_small_fs(mnt, "size=1m,nr_inodes=64,mode=0755")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill_bytes(fs: Path, leave: int) -> list[Path]:
    """One filler file so that about ``leave`` bytes stay free on ``fs``."""
    filler = fs / "filler.bin"
    st = os.statvfs(fs)
    size = max(st.f_bavail * st.f_frsize - leave, 0)
    with open(filler, "wb") as fh:
        fh.write(b"\0" * size)
        os.fsync(fh.fileno())
    return [filler]


def _fill_inodes(fs: Path, leave: int) -> list[Path]:
    """Empty files until the filesystem has no inode left (ENOSPC on create), then ``leave`` freed."""
    made: list[Path] = []
    folder = fs / "fillers"
    folder.mkdir()
    while True:
        path = folder / f"{len(made)}"
        try:
            path.touch()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            break
        made.append(path)
        assert len(made) < 10_000, "tmpfs nr_inodes not honoured"
    for path in made[-leave:]:
        path.unlink()
    return made[:-leave] + [folder]


def _orphans(node: NodeProcess) -> set[str]:
    known = {r[0] for r in node.db("SELECT spool_path FROM instances WHERE spool_path IS NOT NULL")}
    return node.spool_files() - known


@pytest.mark.parametrize(
    "mode, min_free_bytes",
    [
        # refused before writing: free space minus the object would fall under storage.min_free_bytes
        ("bytes-threshold", 256 * 1024),
        # no threshold, and the filesystem itself refuses: ENOSPC when the spool file is created
        # (no inode left; on a tmpfs the byte count is checked exactly before writing, so the
        # inode table is how a test makes the write itself fail)
        ("enospc-on-write", 0),
    ],
)
def test_spool_out_of_space_refuses_with_a700_and_recovers(
    small_fs: Path, tmp_path: Path, make_node, mode: str, min_free_bytes: int
) -> None:
    node: NodeProcess = make_node(
        overrides={"storage": {"spool_dir": str(small_fs / "spool"), "min_free_bytes": min_free_bytes}}
    )
    node.start()
    files = make_series(tmp_path / "objs", 12, generate_uid())
    warmup = send_tracked(node.port, files[:1])  # creates the spool's date folders
    assert warmup.acked == files[:1], warmup.output
    if mode == "bytes-threshold":
        fillers = _fill_bytes(small_fs, leave=min_free_bytes + int(3.5 * files[0].stat().st_size))
    else:
        fillers = _fill_inodes(small_fs, leave=3)

    first = send_tracked(node.port, files[1:])
    acked, refused = first.acked, first.refused
    assert len(first.statuses) == len(files) - 1, first.output  # every store got an answer
    assert 1 <= len(acked) < len(files) - 1, first.output
    assert set(refused.values()) == {OUT_OF_RESOURCES}, refused
    assert node.running, "the node died when its spool filled up"
    assert "spool full, store refused" in node.log_text()
    if mode == "enospc-on-write":
        assert "No space left on device" in node.log_text()

    # nothing refused was kept: no row, no spool file, no temporary file
    assert node.db_value("SELECT count(*) FROM instances") == 1 + len(acked)
    assert _orphans(node) == set()
    assert node.spool_temp_files() == []

    # space comes back: the same node takes the refused objects
    for path in sorted(fillers, reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    second = send_tracked(node.port, list(refused))
    assert second.acked == list(refused), second.output
    wait_for(lambda: node.db_value("SELECT count(*) FROM instances WHERE status = 'analysed'") == len(files), 60,
             "every instance analysed")
    assert node.db_value("SELECT count(*) FROM verdicts") == len(files)
    assert _orphans(node) == set()
    print(f"SPOOL-FULL[{mode}] " + json.dumps({"sent": len(files), "acked_before_full": 1 + len(acked),
                                              "refused_a700": len(refused), "orphans": 0,
                                              "acked_after_space_returned": len(second.acked)}))


def test_database_locked_refuses_with_a700_and_recovers(tmp_path: Path, make_node) -> None:
    """With the write-ahead journal (the default), a store is acknowledged once it is in the
    journal; its row waits for the lock. Once a commit has failed, new stores are refused
    with 0xA700 until one succeeds. Nothing acknowledged is lost, nothing refused is kept."""
    busy_timeout = 1.5
    # ?timeout=: the SQLite busy timeout (default 30 s), short so the test need not wait long
    url = f"sqlite:///{tmp_path / 'db' / 'dski.sqlite3'}?timeout={busy_timeout}"
    # one receiver process: each receiver learns of the failed commit from its own journal,
    # so with several the first store after the failure may go to one that has not yet
    node: NodeProcess = make_node(overrides={"storage": {"database_url": url}, "listener": {"receiver_processes": 1}})
    node.start()
    files = make_series(tmp_path / "objs", 7, generate_uid())
    before = send_tracked(node.port, files[:2])
    assert before.acked == files[:2], before.output
    wait_for(lambda: node.db_value("SELECT count(*) FROM instances WHERE status = 'analysed'") == 2, 60, "analysed")

    # another process takes the write lock and keeps it past the node's busy timeout
    lock = sqlite3.connect(node.db_path, isolation_level=None, timeout=10)
    lock.execute("BEGIN EXCLUSIVE")
    locked_at = time.monotonic()
    try:
        journaled = send_tracked(node.port, files[2:3])
        assert journaled.acked == files[2:3], journaled.output  # durable in the journal
        assert node.journaled_uids() >= {sop_uid(files[2])}
        wait_for(lambda: "journal batch not applied" in node.log_text(), 30, "a failed commit")
        during = send_tracked(node.port, files[3:])
        held = time.monotonic() - locked_at
        assert len(during.statuses) == 4, during.output
        assert during.acked == [], "a store was acknowledged after the database had failed a commit"
        assert set(during.refused.values()) == {OUT_OF_RESOURCES}, during.refused
        assert node.running
        # nothing refused was kept: the spool holds only acknowledged objects (the journaled
        # one's file comes and goes while its commit is retried)
        in_spool = set()
        for rel in node.spool_files():
            try:
                in_spool.add(sop_uid(node.spool_dir / rel))
            except FileNotFoundError:  # the retry's file, removed after its failed commit
                continue
        assert in_spool <= {sop_uid(p) for p in files[:3]}, in_spool
        assert node.spool_temp_files() == []
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert "database unavailable, store refused" in node.log_text()

    after = send_tracked(node.port, files[3:])
    assert after.acked == files[3:], after.output
    wait_for(lambda: node.db_value("SELECT count(*) FROM instances WHERE status = 'analysed'") == 7, 60,
             "every instance analysed after the lock")
    assert node.db_value("SELECT count(*) FROM instances") == 7
    assert node.db_value("SELECT count(*) FROM verdicts") == 7
    assert _orphans(node) == set()
    print("DB-LOCKED " + json.dumps({"busy_timeout_s": busy_timeout, "lock_held_s": round(held, 1),
                                     "acked_into_journal": 1, "refused_a700": len(during.refused),
                                     "orphans": 0, "acked_after_release": len(after.acked)}))
