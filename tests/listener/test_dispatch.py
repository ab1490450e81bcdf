"""Delivery of reports: a real Orthanc as the PACS, pynetdicom SCPs for the failure modes, backoff."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from listener.config import Destination, DispatchConfig, ReportConfig
from listener.dispatch import Dispatcher, SendResult, backoff_delay, send_dataset
from listener.report import AlgorithmInfo, ReportItem, build_report, write_report
from tests.peers import OrthancServer, echoscu, free_port, run_dsrdump, storescu

ALGO = AlgorithmInfo(name="DSKI", version="1.0.0", model_version="dski-default@1.0.0+0123456789ab")
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _report(tmp_path, source: Dataset | None = None, score: float = 0.91):
    source = source or pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    sr = build_report(
        [ReportItem(source, score, "fake" if score >= 0.5 else "real", 0.5)],
        algorithm=ALGO,
        cfg=ReportConfig(),
        scope="series",
    )
    return sr, write_report(sr, tmp_path / "reports")


# --------------------------------------------------------------------------- backoff


def test_backoff_is_exponential_capped_and_deterministic():
    delays = [backoff_delay(n, 5, 600) for n in range(0, 10)]
    assert delays == [0, 5, 10, 20, 40, 80, 160, 320, 600, 600]
    assert backoff_delay(10_000, 5, 600) == 600  # no overflow
    assert backoff_delay(3, 0.5, 1.5) == 1.5
    assert [backoff_delay(4, 5, 600) for _ in range(3)] == [40, 40, 40]  # no jitter
    with pytest.raises(ValueError):
        backoff_delay(1, 0, 600)


def test_next_attempt_and_dead_letter():
    cfg = DispatchConfig(max_attempts=3, backoff_initial_seconds=5, backoff_max_seconds=600)
    dispatcher = Dispatcher(cfg, "DSKI")
    now = datetime(2025, 1, 1, 12, 0, tzinfo=timezone.utc)
    assert dispatcher.next_attempt(0, now) == now
    assert dispatcher.next_attempt(1, now) == now + timedelta(seconds=5)
    assert dispatcher.next_attempt(2, now) == now + timedelta(seconds=10)
    assert dispatcher.next_attempt(3, now) is None  # dead
    assert dispatcher.next_attempt(4, now) is None
    assert dispatcher.next_attempt(1, now).tzinfo is timezone.utc


def test_dispatcher_passes_settings_and_contains_sender_errors(tmp_path):
    dest = Destination(name="PACS", ae_title="PACS", host="127.0.0.1", port=104)
    cfg = DispatchConfig(destinations=(dest,), timeout_seconds=7)
    calls = []

    def fake_send(path, destination, *, calling_ae, timeout):
        calls.append((path, destination, calling_ae, timeout))
        return SendResult(True, 0, None)

    dispatcher = Dispatcher(cfg, "DSKI", send=fake_send)
    assert dispatcher.deliver(tmp_path / "r.dcm", dest) == SendResult(True, 0, None)
    assert dispatcher.deliver(tmp_path / "r.dcm", "PACS").ok  # by configured name
    assert calls == [(tmp_path / "r.dcm", dest, "DSKI", 7), (tmp_path / "r.dcm", dest, "DSKI", 7)]
    with pytest.raises(KeyError, match="NOPE"):
        dispatcher.deliver(tmp_path / "r.dcm", "NOPE")

    def broken_send(*args, **kwargs):
        raise RuntimeError("boom")

    result = Dispatcher(cfg, "DSKI", send=broken_send).deliver(tmp_path / "r.dcm", dest)
    assert not result.ok and "boom" in result.error


# --------------------------------------------------------------------------- failures without a PACS


def test_closed_port_is_a_failed_result_not_an_exception(tmp_path):
    _, path = _report(tmp_path)
    dest = Destination(name="GONE", ae_title="GONE", host="127.0.0.1", port=free_port())
    started = time.monotonic()
    result = send_dataset(path, dest, calling_ae="DSKI", timeout=5)
    assert not result.ok
    assert result.status is None
    assert "GONE@127.0.0.1" in result.error
    assert time.monotonic() - started < 5


def test_unreadable_report_is_a_failed_result(tmp_path):
    dest = Destination(name="X", ae_title="X", host="127.0.0.1", port=free_port())
    result = send_dataset(tmp_path / "missing.dcm", dest, calling_ae="DSKI", timeout=2)
    assert not result.ok and "cannot read" in result.error
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    assert not send_dataset(tmp_path / "junk.dcm", dest, calling_ae="DSKI", timeout=2).ok


class _Scp:
    """A pynetdicom SCP on loopback with a chosen C-STORE answer."""

    def __init__(self, status: int = 0x0000, contexts=(COMPREHENSIVE_3D_SR,), require_calling_aet=(), delay=0.0):
        self.port = free_port()
        self.received: list[Dataset] = []
        self.status = status
        self.delay = delay
        ae = AE(ae_title="SCP")
        for uid in contexts:
            ae.add_supported_context(uid)
        ae.add_supported_context(Verification)
        ae.require_calling_aet = list(require_calling_aet)
        self.ae = ae
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event):
        self.received.append(event.dataset)
        time.sleep(self.delay)
        return self.status

    def dest(self) -> Destination:
        return Destination(name="SCP", ae_title="SCP", host="127.0.0.1", port=self.port)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def test_success_and_in_memory_dataset(tmp_path):
    sr, path = _report(tmp_path)
    with _Scp() as scp:
        by_path = send_dataset(path, scp.dest(), calling_ae="DSKI", timeout=5)
        in_memory = send_dataset(sr, scp.dest(), calling_ae="DSKI", timeout=5)
        assert by_path == SendResult(True, 0, None)
        assert in_memory == SendResult(True, 0, None)
        assert [d.SOPInstanceUID for d in scp.received] == [sr.SOPInstanceUID] * 2


def test_failure_status_is_reported(tmp_path):
    _, path = _report(tmp_path)
    with _Scp(status=0xA700) as scp:
        result = send_dataset(path, scp.dest(), calling_ae="DSKI", timeout=5)
    assert not result.ok and result.status == 0xA700
    assert "0xA700" in result.error


def test_warning_status_counts_as_delivered(tmp_path):
    _, path = _report(tmp_path)
    with _Scp(status=0xB000) as scp:
        result = send_dataset(path, scp.dest(), calling_ae="DSKI", timeout=5)
    assert result.ok and result.status == 0xB000


def test_silent_peer_times_out(tmp_path):
    _, path = _report(tmp_path)
    with _Scp(delay=2.5) as scp:
        started = time.monotonic()
        result = send_dataset(path, scp.dest(), calling_ae="DSKI", timeout=1)
        elapsed = time.monotonic() - started
    assert not result.ok and result.status is None
    assert "within 1 s" in result.error
    assert elapsed < 2.5


def test_rejected_association(tmp_path):
    _, path = _report(tmp_path)
    with _Scp(require_calling_aet=["SOMEONE"]) as scp:
        result = send_dataset(path, scp.dest(), calling_ae="DSKI", timeout=5)
    assert not result.ok and result.status is None
    assert "rejected" in result.error


def test_sop_class_not_accepted(tmp_path):
    _, path = _report(tmp_path)
    with _Scp(contexts=(CTImageStorage,)) as scp:
        result = send_dataset(path, scp.dest(), calling_ae="DSKI", timeout=5)
    assert not result.ok and "presentation context" in result.error


# --------------------------------------------------------------------------- real PACS


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    node_port = free_port()  # the node's own SCP is not running here; Orthanc only needs to know the AE
    tmp = tmp_path_factory.mktemp("orthanc")
    with OrthancServer(tmp, aet="ORTHANC", modalities={"DSKI": ("127.0.0.1", node_port), "MODALITY": ("127.0.0.1", 1)}) as server:
        yield server


def _orthanc_dest(orthanc: OrthancServer) -> Destination:
    return Destination(name="ORTHANC", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port)


@pytest.mark.e2e
def test_report_lands_in_the_source_study_once(orthanc, tmp_path):
    assert echoscu(orthanc.dicom_port, aet="MODALITY", called_aet=orthanc.aet).returncode == 0
    source_path = get_testdata_file("CT_small.dcm")
    sent = storescu(orthanc.dicom_port, [source_path], aet="MODALITY", called_aet=orthanc.aet)
    assert sent.returncode == 0, sent.stderr
    source = pydicom.dcmread(source_path)
    study_id = orthanc.find_study(source.StudyInstanceUID)
    assert study_id is not None

    sr, path = _report(tmp_path, source)
    result = send_dataset(path, _orthanc_dest(orthanc), calling_ae="DSKI", timeout=10)
    assert result == SendResult(True, 0, None)

    instance_id = orthanc.find_instance(sr.SOPInstanceUID)
    assert instance_id is not None
    tags = orthanc.instance_tags(instance_id)
    assert tags["StudyInstanceUID"] == source.StudyInstanceUID
    assert tags["SeriesInstanceUID"] == sr.SeriesInstanceUID
    assert tags["Modality"] == "SR"
    assert tags["SOPClassUID"] == COMPREHENSIVE_3D_SR
    series = orthanc.study_series(study_id)
    assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["CT", "SR"]
    count = len(orthanc.instances())

    # A re-send (retry after a lost response) is a duplicate: success, still one copy.
    again = send_dataset(path, _orthanc_dest(orthanc), calling_ae="DSKI", timeout=10)
    assert again == SendResult(True, 0, None)
    assert len(orthanc.instances()) == count
    assert orthanc.find_instance(sr.SOPInstanceUID) == instance_id

    # What the PACS stores is still a readable SR.
    stored = tmp_path / "stored.dcm"
    stored.write_bytes(orthanc.instance_file(instance_id))
    assert run_dsrdump(stored).returncode == 0
    assert pydicom.dcmread(stored).SOPInstanceUID == sr.SOPInstanceUID


@pytest.mark.e2e
def test_dispatcher_delivers_to_orthanc(orthanc, tmp_path):
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    sr, path = _report(tmp_path, mr, score=0.12)
    dispatcher = Dispatcher(DispatchConfig(destinations=(_orthanc_dest(orthanc),), timeout_seconds=10), "DSKI")
    assert dispatcher.deliver(path, "ORTHANC").ok
    assert orthanc.find_study(mr.StudyInstanceUID) is not None  # the SR alone creates the study
    assert orthanc.find_instance(sr.SOPInstanceUID) is not None


@pytest.mark.e2e
def test_non_latin_patient_name_survives_the_pacs(orthanc, tmp_path):
    from tests.listener.test_report import synthetic_ct

    name = "Παπαδόπουλος^Γιώργος"
    source = synthetic_ct(1, study="1.2.826.0.1.3680043.8.498.77", series="1.2.826.0.1.3680043.8.498.77.1", name=name)
    sr, path = _report(tmp_path, source)
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert send_dataset(path, _orthanc_dest(orthanc), calling_ae="DSKI", timeout=10).ok
    tags = orthanc.instance_tags(orthanc.find_instance(sr.SOPInstanceUID))
    assert tags["PatientName"] == name
    assert tags["SpecificCharacterSet"] == "ISO_IR 192"


@pytest.mark.e2e
def test_unknown_calling_ae_fails_cleanly(orthanc, tmp_path):
    """Orthanc accepts the association of an AE it does not know, then drops it without a C-STORE response."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    source.SOPInstanceUID = source.SOPInstanceUID + ".7"  # a report Orthanc does not hold yet
    sr, path = _report(tmp_path, source, score=0.33)
    started = time.monotonic()
    result = send_dataset(path, _orthanc_dest(orthanc), calling_ae="STRANGER", timeout=3)
    assert not result.ok
    assert "without a C-STORE response" in result.error and "STRANGER" in result.error, result.error
    assert time.monotonic() - started < 15
    assert orthanc.find_instance(sr.SOPInstanceUID) is None
