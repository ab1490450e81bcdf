"""The listener against dcmtk's storescu / echoscu on loopback, with the real spool and database.

No detector is involved here: the SCP only stores and records.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

from listener.acceptor import Status
from listener.config import NodeConfig, parse_config
from listener.dimse import (
    C_STORE_RQ,
    STATUS_BAD_UID,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_TOO_LARGE,
    Command,
)
from listener.header import InvalidObjectError, parse_header, valid_uid
from listener.scp import JOURNALS_FOLDER, StorageSCP
from storage.database import Database
from storage.errors import DatabaseUnavailableError
from storage.journal import journal_records
from storage.journal_apply import decode_meta
from storage.repository import Repository
from storage.spool import Spool
from tests.peers import echoscu, free_port, storescu

AET = "DSKI"


def _testfile(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(path)


def _config(port: int, journal: bool = True, **listener: Any) -> NodeConfig:
    return parse_config(
        {
            "storage": {"journal": {"enabled": journal}},
            "listener": {
                "ae_title": AET,
                "host": "127.0.0.1",
                "port": port,
                "calling_aes": [
                    {"ae_title": "STORESCU", "host": "127.0.0.1"},
                    {"ae_title": "ECHOSCU"},
                    {"ae_title": "FARAWAY", "host": "192.0.2.7"},
                ],
                **listener,
            }
        }
    )


@dataclass
class Node:
    port: int
    scp: StorageSCP
    spool: Spool
    repo: Repository
    db_path: Path

    def rows(self) -> list[sqlite3.Row]:
        """Committed rows, read through a separate connection (once the journal, if any, is applied)."""
        assert self.scp.wait_stored(10), "journal not applied within 10 s"
        return self.committed_rows()

    def committed_rows(self) -> list[sqlite3.Row]:
        con = sqlite3.connect(self.db_path)
        con.row_factory = sqlite3.Row
        try:
            return con.execute("SELECT * FROM instances ORDER BY id").fetchall()
        finally:
            con.close()

    def spool_files(self) -> list[Path]:
        assert self.scp.wait_stored(10), "journal not applied within 10 s"
        return sorted(self.spool.root / p for p in self.spool.iter_files())


def _start(
    tmp_path: Path, *, repo_wrapper=None, min_free_bytes: int = 0, on_response=None, journal: bool = True,
    **listener: Any,
) -> Node:
    port = free_port()
    db_path = tmp_path / "dski.sqlite3"
    db = Database(f"sqlite:///{db_path}")
    db.migrate()
    repo = Repository(db)
    spool = Spool(tmp_path / "spool", min_free_bytes)
    scp = StorageSCP(_config(port, journal, **listener), spool, repo_wrapper(repo) if repo_wrapper else repo)
    scp.start(on_response=on_response)
    return Node(port, scp, spool, repo, db_path)


# every store test runs on both durable paths: the write-ahead journal (the default) and
# the spool file plus committed row before the response (storage.journal.enabled: false)
@pytest.fixture(params=[True, False], ids=["journal", "direct"])
def node(tmp_path: Path, request: pytest.FixtureRequest):
    n = _start(tmp_path, journal=request.param)
    yield n
    n.scp.stop(grace_seconds=2)


def _store(node: Node, *files: Path, aet: str = "STORESCU", extra_args: tuple[str, ...] = ("-d",)):
    return storescu(node.port, files, aet=aet, called_aet=AET, extra_args=extra_args)


# --------------------------------------------------------------------------- association


def test_echo_succeeds(node: Node) -> None:
    proc = echoscu(node.port, aet="ECHOSCU", called_aet=AET)
    assert proc.returncode == 0, proc.stderr


def test_unknown_calling_ae_rejected_at_association(node: Node) -> None:
    proc = echoscu(node.port, aet="INTRUDER", called_aet=AET)
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stderr + proc.stdout


def test_known_ae_from_wrong_host_rejected(node: Node) -> None:
    # FARAWAY is only allowed from 192.0.2.7; this association comes from 127.0.0.1
    proc = echoscu(node.port, aet="FARAWAY", called_aet=AET)
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stderr + proc.stdout


def test_wrong_called_ae_rejected(node: Node) -> None:
    proc = echoscu(node.port, aet="ECHOSCU", called_aet="SOMEONE-ELSE")
    assert proc.returncode != 0
    assert "Called AE Title Not Recognized" in proc.stderr + proc.stdout


def test_store_refused_before_association_for_unknown_ae(node: Node) -> None:
    proc = _store(node, _testfile("CT_small.dcm"), aet="INTRUDER")
    assert proc.returncode != 0
    assert node.rows() == [] and node.spool_files() == []


# --------------------------------------------------------------------------- C-STORE


def _journaled_uids(spool: Spool) -> list[str]:
    """SOP Instance UIDs of the records in the node's journal segments, read from the files."""
    folder = spool.root / JOURNALS_FOLDER
    return [decode_meta(r.meta).sop_instance_uid for d in sorted(folder.iterdir()) for r in journal_records(d)]


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "direct"])
def test_store_ct_keeps_sent_dataset_and_is_durable_before_response(tmp_path: Path, journal: bool) -> None:
    """Direct: the row is committed before the response. Journal: the record is in a
    segment file before the response (the row follows)."""
    seen_at_response: list[list[str]] = []
    lock = threading.Lock()
    holder: dict[str, Node] = {}

    def on_response(command: Command, status: Status) -> None:
        # called by the acceptor just before the response is handed to the socket
        if command.command_field == C_STORE_RQ:
            n = holder["node"]
            with lock:
                seen_at_response.append(
                    _journaled_uids(n.spool) if journal else [r["sop_instance_uid"] for r in n.committed_rows()]
                )

    n = _start(tmp_path, on_response=on_response, journal=journal)
    holder["node"] = n
    try:
        source = _testfile("CT_small.dcm")
        proc = _store(n, source)
        assert proc.returncode == 0, proc.stderr
    finally:
        n.scp.stop(grace_seconds=2)

    sent = pydicom.dcmread(source)
    assert seen_at_response == [[sent.SOPInstanceUID]]
    rows = n.rows()
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "received"
    assert row["calling_ae"] == "STORESCU"
    assert row["sop_class_uid"] == sent.SOPClassUID
    assert row["study_instance_uid"] == sent.StudyInstanceUID
    assert row["series_instance_uid"] == sent.SeriesInstanceUID
    assert row["patient_id"] == sent.PatientID
    assert row["modality"] == "CT"
    files = n.spool_files()
    assert len(files) == 1
    # the name is random, never a UID
    assert sent.SOPInstanceUID not in files[0].name
    stored = pydicom.dcmread(files[0])
    assert stored.file_meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    # the dataset is what was sent, element for element, pixel data included
    # dcmtk's storescu drops Data Set Trailing Padding when it sends; everything else must match
    sent.pop(0xFFFCFFFC, None)
    assert stored == sent
    assert row["sha256"] == hashlib.sha256(files[0].read_bytes()).hexdigest()


def test_duplicate_is_success_and_leaves_one_file(node: Node) -> None:
    source = _testfile("CT_small.dcm")
    proc = _store(node, source, source)
    assert proc.returncode == 0, proc.stderr
    proc = _store(node, source)
    assert proc.returncode == 0, proc.stderr
    assert len(node.rows()) == 1
    assert len(node.spool_files()) == 1


def test_non_image_stored_as_skipped(node: Node) -> None:
    proc = _store(node, _testfile("test-SR.dcm"))
    assert proc.returncode == 0, proc.stderr
    (row,) = node.rows()
    assert row["status"] == "skipped"
    assert "structured report" in row["status_reason"]
    assert len(node.spool_files()) == 1


def test_own_report_stored_as_skipped_with_reason(node: Node, tmp_path: Path) -> None:
    ds = pydicom.dcmread(_testfile("test-SR.dcm"))
    ds.Manufacturer = NodeConfig().report.manufacturer
    own = tmp_path / "own.dcm"
    ds.save_as(own)
    proc = _store(node, own)
    assert proc.returncode == 0, proc.stderr
    (row,) = node.rows()
    assert (row["status"], row["status_reason"]) == ("skipped", "own report")


@pytest.mark.parametrize(
    ("name", "flag", "transfer_syntax"),
    [
        ("MR_small_RLE.dcm", "-xr", "1.2.840.10008.1.2.5"),
        ("JPEG2000.dcm", "-xw", "1.2.840.10008.1.2.4.91"),
        ("MR_small_jp2klossless.dcm", "-xv", "1.2.840.10008.1.2.4.90"),
        ("MR_small_jpeg_ls_lossless.dcm", "-xt", "1.2.840.10008.1.2.4.80"),
        ("SC_rgb_jpeg_dcmtk.dcm", "-xy", "1.2.840.10008.1.2.4.50"),
    ],
)
def test_compressed_transfer_syntaxes_accepted_as_sent(node: Node, name: str, flag: str, transfer_syntax: str) -> None:
    source = _testfile(name)
    proc = _store(node, source, extra_args=("-v", flag))
    assert proc.returncode == 0, proc.stderr
    (row,) = node.rows()
    assert row["transfer_syntax_uid"] == transfer_syntax
    assert row["status"] == "received"
    (path,) = node.spool_files()
    stored = pydicom.dcmread(path)
    sent = pydicom.dcmread(source)
    assert stored.file_meta.TransferSyntaxUID == transfer_syntax
    assert stored.PixelData == sent.PixelData  # still compressed: never decoded


def test_spool_full_answers_out_of_resources(tmp_path: Path) -> None:
    n = _start(tmp_path, min_free_bytes=1 << 62)  # no disk has this much free: SpoolFullError
    try:
        proc = _store(n, _testfile("CT_small.dcm"))
    finally:
        n.scp.stop(grace_seconds=2)
    assert "0xa700" in (proc.stdout + proc.stderr).lower()
    assert n.rows() == [] and n.spool_files() == []


class _DownRepository:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    def record_received(self, **kwargs: Any) -> Any:
        raise DatabaseUnavailableError("sqlite:///x", "database is locked")


def test_database_unavailable_answers_out_of_resources_and_removes_file(tmp_path: Path) -> None:
    n = _start(tmp_path, repo_wrapper=_DownRepository)
    try:
        proc = _store(n, _testfile("CT_small.dcm"))
    finally:
        n.scp.stop(grace_seconds=2)
    assert "0xa700" in (proc.stdout + proc.stderr).lower()
    assert n.spool_files() == []


def test_object_over_pixel_limit_refused(tmp_path: Path) -> None:
    n = _start(tmp_path, max_pixels=128 * 128 - 1)  # CT_small is 128 x 128
    try:
        proc = _store(n, _testfile("CT_small.dcm"))
    finally:
        n.scp.stop(grace_seconds=2)
    assert f"0x{STATUS_TOO_LARGE:04x}" in (proc.stdout + proc.stderr).lower()
    assert n.rows() == [] and n.spool_files() == []


def test_hostile_uid_refused_and_nothing_written(node: Node, tmp_path: Path) -> None:
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    ds.SeriesInstanceUID = "../../etc/passwd"
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    proc = _store(node, bad)
    assert f"0x{STATUS_BAD_UID:04x}" in (proc.stdout + proc.stderr).lower()
    assert node.rows() == [] and node.spool_files() == []


def test_stop_closes_the_port(tmp_path: Path) -> None:
    n = _start(tmp_path)
    n.scp.stop(grace_seconds=2)
    proc = echoscu(n.port, aet="ECHOSCU", called_aet=AET)
    assert proc.returncode != 0


# --------------------------------------------------------------------------- header parsing (no network)


def _encoded(ds: pydicom.Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_parse_header_reads_the_minimum() -> None:
    data = _testfile("CT_small.dcm").read_bytes()
    header = parse_header(data, max_pixels=10**9)
    assert header.modality == "CT"
    assert header.pixels == 128 * 128
    assert "PixelData" not in header.dataset


@pytest.mark.parametrize("data", [b"", b"\x00" * 10, b"\x00" * 128 + b"DICM" + b"\xff" * 50, b"not dicom at all" * 20])
def test_parse_header_rejects_garbage(data: bytes) -> None:
    with pytest.raises(InvalidObjectError) as info:
        parse_header(data, max_pixels=10**9)
    assert info.value.status in (STATUS_CANNOT_UNDERSTAND, STATUS_BAD_UID)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ("1.2.3\x00", True),
        ("1.2." + "3" * 70, False),
        ("1.2/3", False),
        ("..", False),
        ("", False),
        ("1..2", False),
        ("1.2.3 4", False),
    ],
)
def test_valid_uid(value: str, ok: bool) -> None:
    assert (valid_uid(value) is not None) is ok


def test_parse_header_requires_study_uid() -> None:
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    del ds.StudyInstanceUID
    with pytest.raises(InvalidObjectError) as info:
        parse_header(_encoded(ds), max_pixels=10**9)
    assert info.value.status == STATUS_BAD_UID
    assert "StudyInstanceUID" in info.value.reason
