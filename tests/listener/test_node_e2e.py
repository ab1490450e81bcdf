"""The whole node with real peers: dcmtk storescu as the modality, the real DSKI detector
(a tiny bundle trained here), Orthanc as the PACS, dciodvfy on every SR.

The modality sends each study both to the PACS and to the node, as in a forwarding
setup; the node's SRs must land in the same study on the PACS.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from listener.config import NodeConfig, parse_config
from listener.node import Node
from tests.nodeproc import build_tiny_bundle, make_series
from tests.peers import OrthancServer, dciodvfy_errors, echoscu, free_port, storescu

pytestmark = pytest.mark.e2e

NODE_AET = "DSKI"
SR_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real DSKI bundle: the dski-tiny backbone trained for one epoch on a few generated images."""
    return build_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@dataclass
class Env:
    node: Node
    pacs: OrthancServer
    cfg: NodeConfig
    tmp: Path

    @property
    def port(self) -> int:
        return self.cfg.listener.port

    def db_rows(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        path = self.cfg.storage.database_url.removeprefix("sqlite:///")
        con = sqlite3.connect(path)
        con.row_factory = sqlite3.Row
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def send(self, files: list[Path], *, to_pacs: bool = True) -> None:
        proc = storescu(self.port, files, aet="STORESCU", called_aet=NODE_AET)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        if to_pacs:
            proc = storescu(self.pacs.dicom_port, files, aet="STORESCU", called_aet="ORTHANC")
            assert proc.returncode == 0, proc.stdout + proc.stderr

    def pacs_srs(self, study_uid: str) -> list[Dataset]:
        study = self.pacs.find_study(study_uid)
        if study is None:
            return []
        out = []
        for series in self.pacs.study_series(study):
            if series["MainDicomTags"].get("Modality") != "SR":
                continue
            for instance in series["Instances"]:
                out.append(pydicom.dcmread(_bytes_io(self.pacs.instance_file(instance))))
        return out


def _bytes_io(data: bytes):
    from io import BytesIO

    return BytesIO(data)


@pytest.fixture(scope="module")
def env(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("node")
    node_port = free_port()
    modalities = {NODE_AET: ("127.0.0.1", node_port), "STORESCU": ("127.0.0.1", free_port())}
    with OrthancServer(tmp, modalities=modalities) as pacs:
        cfg = parse_config(
            {
                "listener": {
                    "ae_title": NODE_AET,
                    "host": "127.0.0.1",
                    "port": node_port,
                    "calling_aes": [
                        {"ae_title": "STORESCU", "host": "127.0.0.1"},
                        {"ae_title": "ECHOSCU", "host": "127.0.0.1"},
                    ],
                    "shutdown_grace_seconds": 5,
                },
                "storage": {"min_free_bytes": 0},
                # nice 0: the node runs in the test process, whose later tests must not inherit it
                "detector": {"bundle": str(tiny_bundle), "batch_size": 4, "nice": 0},
                "processing": {"series_idle_seconds": 2, "poll_interval_seconds": 0.2},
                "dispatch": {
                    "destinations": [
                        {"name": "PACS", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
                    ],
                    "interval_seconds": 0.5,
                    "backoff_initial_seconds": 1,
                    "timeout_seconds": 10,
                },
                "retention": {"keep_seconds_after_delivery": 3600},
            }
        ).resolve_paths(tmp)
        node = Node(cfg, configure_logs=False)
        node.start()
        try:
            yield Env(node, pacs, cfg, tmp)
        finally:
            node.stop()


def _series(source: str, out: Path, count: int, study_uid: str) -> list[Path]:
    return make_series(out, count, study_uid, source=source, patient="E2E^PATIENT", patient_id="E2E-1")


def _non_image(out: Path, study_uid: str) -> Path:
    ds = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID = "E2E-1"
    path = out / "foreign-sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def _walk(items) -> Iterator[Dataset]:
    for item in items or []:
        yield item
        yield from _walk(item.get("ContentSequence"))


def _code(item: Dataset) -> str | None:
    names = item.get("ConceptNameCodeSequence")
    return names[0].CodeValue if names else None


def _verdicts_in_sr(sr: Dataset) -> dict[str, float]:
    """SOP Instance UID -> probability, from the per-image measurement groups."""
    out: dict[str, float] = {}
    for item in _walk(sr.ContentSequence):
        if item.get("ValueType") != "CONTAINER" or _code(item) != codes.DCM.MeasurementGroup.value:
            continue
        images = [c for c in item.ContentSequence if c.ValueType == "IMAGE"]
        numbers = [c for c in item.ContentSequence if c.ValueType == "NUM" and _code(c) == codes.DCM.Probability.value]
        if len(images) == 1 and len(numbers) == 1:
            uid = images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            out[uid] = float(numbers[0].MeasuredValueSequence[0].NumericValue)
    return out


def _evidence(sr: Dataset) -> set[str]:
    uids = set()
    for study in sr.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            uids |= {s.ReferencedSOPInstanceUID for s in series.ReferencedSOPSequence}
    return uids


def _library(sr: Dataset) -> set[str]:
    return {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in _walk(sr.ContentSequence)
        if item.get("ValueType") == "IMAGE"
    }


# --------------------------------------------------------------------------- tests


def test_echo_and_unknown_ae(env: Env) -> None:
    ok = echoscu(env.port, aet="ECHOSCU", called_aet=NODE_AET)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = echoscu(env.port, aet="STRANGER", called_aet=NODE_AET)
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr


def test_dski_echo_reaches_the_pacs(env: Env) -> None:
    from typer.testing import CliRunner

    from listener.cli import app

    shipped = Path(__file__).resolve().parents[2] / "config.yaml"
    result = CliRunner().invoke(app, ["echo", f"ORTHANC@127.0.0.1:{env.pacs.dicom_port}", "--config", str(shipped)])
    assert result.exit_code == 0, result.output
    assert "success" in result.output
    result = CliRunner().invoke(app, ["echo", f"ORTHANC@127.0.0.1:{free_port()}", "--config", str(shipped)])
    assert result.exit_code == 1


def test_ct_and_mr_series_get_one_sr_each_in_the_pacs(env: Env) -> None:
    study_uid = generate_uid()
    out = env.tmp / "study1"
    ct = _series("CT_small.dcm", out / "ct", 4, study_uid)
    mr = _series("MR_small.dcm", out / "mr", 3, study_uid)
    foreign = _non_image(out, study_uid)
    env.send([*ct, *mr, foreign])

    srs = _wait(lambda: (lambda s: s if len(s) >= 2 else None)(env.pacs_srs(study_uid)), 120, "two SRs in the PACS")
    time.sleep(1.0)
    srs = [sr for sr in env.pacs_srs(study_uid) if sr.get("Manufacturer") == env.cfg.report.manufacturer]
    assert len(srs) == 2, "one SR per series"

    sent = {
        "ct": {pydicom.dcmread(p).SOPInstanceUID for p in ct},
        "mr": {pydicom.dcmread(p).SOPInstanceUID for p in mr},
    }
    foreign_uid = pydicom.dcmread(foreign).SOPInstanceUID
    db = {
        r["sop_instance_uid"]: r
        for r in env.db_rows(
            "SELECT i.sop_instance_uid, i.status, i.status_reason, v.score, v.label FROM instances i "
            "LEFT JOIN verdicts v ON v.instance_id = i.id WHERE i.study_instance_uid = ?",
            study_uid,
        )
    }
    by_series = {}
    for sr in srs:
        assert sr.StudyInstanceUID == study_uid
        assert sr.SOPClassUID.startswith(SR_CLASS_PREFIX)
        verdicts = _verdicts_in_sr(sr)
        key = "ct" if set(verdicts) == sent["ct"] else "mr"
        by_series[key] = sr
        # every instance sent is referenced: evidence, image library and a measurement group each
        assert set(verdicts) == sent[key]
        assert _evidence(sr) == sent[key]
        assert _library(sr) == sent[key]
        for uid, score in verdicts.items():
            assert db[uid]["status"] == "analysed"
            assert score == pytest.approx(db[uid]["score"], abs=1e-9)
    assert set(by_series) == {"ct", "mr"}
    # the SRs are new series of the study, not the source series
    source_series = {pydicom.dcmread(ct[0]).SeriesInstanceUID, pydicom.dcmread(mr[0]).SeriesInstanceUID}
    assert not {sr.SeriesInstanceUID for sr in srs} & source_series

    # the non-image object was skipped, never scored, never referenced
    assert db[foreign_uid]["status"] == "skipped"
    assert db[foreign_uid]["score"] is None
    assert "structured report" in db[foreign_uid]["status_reason"]
    assert all(foreign_uid not in _library(sr) for sr in srs)

    # the outbox says sent; the files in reports_dir are valid for their IOD
    reports = env.db_rows("SELECT sop_instance_uid, status, path FROM reports WHERE study_instance_uid = ?", study_uid)
    assert {r["sop_instance_uid"] for r in reports} == {sr.SOPInstanceUID for sr in srs}
    assert {r["status"] for r in reports} == {"sent"}
    written = sorted(Path(env.cfg.storage.reports_dir).glob("*.dcm"))
    assert {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in written} >= {sr.SOPInstanceUID for sr in srs}
    for path in written:
        assert dciodvfy_errors(path) == [], path


def test_sending_the_same_series_twice_gives_no_second_sr(env: Env) -> None:
    study_uid = generate_uid()
    ct = _series("CT_small.dcm", env.tmp / "study2", 3, study_uid)
    env.send(ct)
    _wait(lambda: len(env.pacs_srs(study_uid)) == 1, 120, "the first SR")
    reports_before = env.db_rows("SELECT id FROM reports WHERE study_instance_uid = ?", study_uid)
    instances_before = env.db_rows("SELECT id FROM instances WHERE study_instance_uid = ?", study_uid)

    env.send(ct, to_pacs=False)  # the modality sends the series again
    # longer than series completion plus a few dispatch rounds
    time.sleep(env.cfg.processing.series_idle_seconds + 4 * env.cfg.dispatch.interval_seconds + 2)

    assert len(env.pacs_srs(study_uid)) == 1
    assert env.db_rows("SELECT id FROM reports WHERE study_instance_uid = ?", study_uid) == reports_before
    assert env.db_rows("SELECT id FROM instances WHERE study_instance_uid = ?", study_uid) == instances_before



def test_unusable_pixel_data_fails_with_reason_and_stays_out_of_the_sr(env: Env) -> None:
    study_uid = generate_uid()
    good, broken = _series("CT_small.dcm", env.tmp / "study3", 2, study_uid)
    ds = pydicom.dcmread(broken)
    ds.PixelData = ds.PixelData[:1000]  # shorter than Rows x Columns x 2 bytes
    ds.save_as(broken, enforce_file_format=True)
    env.send([good, broken])

    (sr,) = _wait(lambda: env.pacs_srs(study_uid), 120, "the SR of the readable image")
    good_uid, broken_uid = pydicom.dcmread(good).SOPInstanceUID, ds.SOPInstanceUID
    assert set(_verdicts_in_sr(sr)) == {good_uid}
    (row,) = env.db_rows(
        "SELECT i.status, i.status_reason, v.id AS verdict FROM instances i "
        "LEFT JOIN verdicts v ON v.instance_id = i.id WHERE i.sop_instance_uid = ?",
        broken_uid,
    )
    assert row["status"] == "failed"
    assert row["status_reason"]
    assert row["verdict"] is None
