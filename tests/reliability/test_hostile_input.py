"""Hostile and broken input, one named case per test (issue 5, item 3).

Every case goes through the real listener (``listener.scp.StorageSCP`` with the real
spool and the real repository on a SQLite file) over a real association; the data set
bytes are sent exactly as built (``RawSCU.store_raw``), so broken encodings reach the
listener unchanged. The answer is asserted to the exact DIMSE status. Where the
listener rightly accepts the bytes (the fault is only visible when the pixels are
decoded), the real worker pipeline (``listener.pipeline.Pipeline`` with a real, tiny
DSKI bundle) must end the instance ``failed`` with a reason and no verdict. The same
files go through ``dski detect`` (one CLI run for the whole module): a JSON line with
an error and no score, exit status 1.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from listener.config import parse_config
from listener.pipeline import Pipeline
from listener.dimse import STATUS_BAD_UID, STATUS_CANNOT_UNDERSTAND, STATUS_SUCCESS, STATUS_TOO_LARGE
from tests.reliability.hostile_helpers import (
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    ListenerHandle,
    RawSCU,
    all_contexts,
    encode_dataset,
    explicit_element,
    image_dataset,
    make_tiny_bundle,
    pdf_dataset,
    rss_kib,
    sr_dataset,
    start_listener,
    write_file,
    write_raw_file,
)

JPEG_XL_LOSSLESS = "1.2.840.10008.1.2.4.110"  # a transfer syntax DICOM defines and the detector cannot decode
UNKNOWN_TS = "1.2.826.0.1.3680043.9.9999.1"  # not a DICOM transfer syntax at all

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ListenerHandle]:
    handle = start_listener(tmp_path_factory.mktemp("hostile-node"))
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("hostile-bundle") / "bundle")


@pytest.fixture(scope="module")
def detector(bundle: Path):
    from detector.detector import Detector

    return Detector.load(bundle, device="cpu", batch_size=8)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The hostile objects as files, for ``dski detect`` (same faults as on the wire)."""
    out = tmp_path_factory.mktemp("hostile-files")
    made: dict[str, Path] = {}
    ds = image_dataset()
    made["good"] = write_file(ds, out / "good.dcm")
    raw = encode_dataset(ds)
    made["truncated"] = write_raw_file(ds, raw[: raw.find(ds.SeriesInstanceUID.encode()) + 21], out / "truncated.dcm")
    made["truncated_pixels"] = write_raw_file(ds, raw[:-100], out / "truncated-pixels.dcm")
    made["short_pixels"] = write_file(_short_pixels(), out / "short-pixels.dcm")
    made["bits_allocated_32"] = write_file(_bits_allocated(32), out / "ba32.dcm")
    made["bits_allocated_12"] = write_file(_bits_allocated(12), out / "ba12.dcm")
    made["bits_allocated_8"] = write_file(_bits_allocated(8), out / "ba8.dcm")
    made["jpeg_xl"] = write_file(_jpeg_xl(), out / "jpegxl.dcm")
    made["bomb"] = write_file(_bomb(), out / "bomb.dcm")
    made["sr"] = write_file(sr_dataset(), out / "sr.dcm")
    made["zero"] = out / "zero.dcm"
    made["zero"].write_bytes(b"")
    made["meta_only"] = write_raw_file(ds, b"", out / "meta-only.dcm")
    return made


@pytest.fixture(scope="module")
def detect_lines(bundle: Path, files: dict[str, Path]) -> dict[str, dict]:
    """``dski detect --bundle B <every file>`` once; name -> its JSON line."""
    from typer.testing import CliRunner

    from listener.cli import app

    names = list(files)
    result = CliRunner().invoke(app, ["detect", "--bundle", str(bundle), *map(str, files.values())])
    assert result.exit_code == 1, result.output  # some files failed, none crashed the command
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    by_path = {line["path"]: line for line in lines}
    assert len(by_path) == len(names), result.output
    return {name: by_path[str(files[name])] for name in names}


# --------------------------------------------------------------------------- helpers


def _store(node: ListenerHandle, payload: bytes, sop_class: str, sop_instance: str, ts: str = ExplicitVRLittleEndian):
    with RawSCU(node.port, all_contexts((ExplicitVRLittleEndian, RLELossless, JPEG_XL_LOSSLESS))) as scu:
        assert scu.established
        return scu.store_raw(payload, sop_class, sop_instance, ts)


def _rows(node: ListenerHandle, sop_instance: str):
    return node.query(
        "SELECT i.*, v.id AS verdict_id, v.score FROM instances i LEFT JOIN verdicts v ON v.instance_id = i.id "
        "WHERE i.sop_instance_uid = ?",
        sop_instance,
    )


def _assert_refused(node: ListenerHandle, rsp, status: int, sop_instance: str, spool_before: int, reason: str) -> None:
    assert int(rsp.Status) == status, rsp
    assert reason in str(rsp.get("ErrorComment", "")), rsp
    assert _rows(node, sop_instance) == []
    assert len(node.spool_files()) == spool_before  # refused bytes are not kept


def _process(node: ListenerHandle, detector) -> None:
    """The real worker pipeline as shipped (its worker threads and decoding process), started
    until the queue is empty."""
    node.settle()  # the acknowledged rows are in the database (the journal applied them)
    cfg = parse_config({"detector": {"batch_size": 8, "batch_wait_ms": 0}})
    assert cfg.detector.decode_processes > 0  # the shipped path decodes in a child process
    pipeline = Pipeline(node.repo, detector, node.spool, cfg)
    pipeline.start()
    try:
        deadline = time.monotonic() + 120
        while node.query("SELECT id FROM instances WHERE status IN ('received', 'analysing')"):
            assert time.monotonic() < deadline, "the workers did not empty the queue"
            time.sleep(0.02)
    finally:
        pipeline.stop()


def _assert_failed_without_score(node: ListenerHandle, detector, sop_instance: str, reason: str) -> None:
    _process(node, detector)
    (row,) = _rows(node, sop_instance)
    assert row["status"] == "failed", dict(row)
    assert reason in row["status_reason"], row["status_reason"]
    assert row["verdict_id"] is None and row["score"] is None


def _assert_detect_error(line: dict, reason: str) -> None:
    assert "score" not in line, line
    assert reason in line["error"], line


def _short_pixels():
    ds = image_dataset()
    ds.PixelData = ds.PixelData[:1000]  # 64 x 64 x 2 bytes declared by the header
    return ds


def _bits_allocated(bits: int):
    ds = image_dataset()  # pixel data written as 16-bit samples
    ds.BitsAllocated = bits
    ds.BitsStored = min(12, bits)
    ds.HighBit = ds.BitsStored - 1
    return ds


def _jpeg_xl():
    ds = image_dataset(transfer_syntax=JPEG_XL_LOSSLESS)
    ds.PixelData = encapsulate([b"\xff\x0a" + bytes(200)])  # a JPEG XL codestream signature, then nothing useful
    ds["PixelData"].VR = "OB"
    return ds


def _bomb():
    """65535 x 65535 x 1000 frames declared (4.3e12 pixels), RLE encapsulated, 40 bytes of pixel data."""
    ds = image_dataset(transfer_syntax=RLELossless)
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 1000
    ds.PixelData = encapsulate([bytes(32)])
    ds["PixelData"].VR = "OB"
    return ds


# --------------------------------------------------------------------------- truncated file


def test_truncated_file_inside_a_uid_refused_cannot_understand(node: ListenerHandle) -> None:
    ds = image_dataset()
    raw = encode_dataset(ds)
    cut = raw.find(ds.SeriesInstanceUID.encode()) + 21  # the UID cut to "1.2.826.0.1.3680043.8": still UID-shaped
    before = len(node.spool_files())
    rsp = _store(node, raw[:cut], ds.SOPClassUID, ds.SOPInstanceUID)
    _assert_refused(node, rsp, STATUS_CANNOT_UNDERSTAND, ds.SOPInstanceUID, before, "truncated")


def test_truncated_file_inside_pixel_data_refused_cannot_understand(node: ListenerHandle) -> None:
    ds = image_dataset()
    raw = encode_dataset(ds)
    before = len(node.spool_files())
    rsp = _store(node, raw[:-100], ds.SOPClassUID, ds.SOPInstanceUID)
    _assert_refused(node, rsp, STATUS_CANNOT_UNDERSTAND, ds.SOPInstanceUID, before, "(7FE0,0010)")


def test_truncated_file_every_cut_in_the_header_is_refused_or_fails(node: ListenerHandle, detector) -> None:
    """Cut after every 4th of the first 400 bytes (the whole header). A cut inside an element is
    refused (0xC000 / 0xC001, a UID cut short); a cut exactly between two elements leaves a
    well-formed data set without pixel data: stored, then ``failed``, never scored."""
    seen: dict[int, int] = {}
    accepted: list[str] = []
    with RawSCU(node.port, all_contexts((ExplicitVRLittleEndian,))) as scu:
        for cut in range(0, 400, 4):
            ds = image_dataset()
            code = int(scu.store_raw(encode_dataset(ds)[:cut], ds.SOPClassUID, ds.SOPInstanceUID).Status)
            seen[code] = seen.get(code, 0) + 1
            if code == STATUS_SUCCESS:
                accepted.append(ds.SOPInstanceUID)
    assert set(seen) <= {STATUS_CANNOT_UNDERSTAND, STATUS_BAD_UID, STATUS_SUCCESS}, seen
    assert seen.get(STATUS_CANNOT_UNDERSTAND, 0) > 80  # of 100 cuts
    _process(node, detector)
    for uid in accepted:
        (row,) = _rows(node, uid)
        assert row["status"] == "failed" and row["verdict_id"] is None, dict(row)
        assert "Pixel Data" in row["status_reason"] or "missing" in row["status_reason"], row["status_reason"]


def test_truncated_file_through_dski_detect(detect_lines: dict[str, dict]) -> None:
    # the file ends inside the Series Instance UID: no pixel data to score
    _assert_detect_error(detect_lines["truncated"], "no Pixel Data")
    _assert_detect_error(detect_lines["truncated_pixels"], "pixel data truncated")


# --------------------------------------------------------------------------- wrong VR


def test_wrong_vr_text_in_a_numeric_element_refused_cannot_understand(node: ListenerHandle) -> None:
    ds = image_dataset()
    raw = encode_dataset(ds)
    rows = explicit_element(0x0028, 0x0010, "US", (64).to_bytes(2, "little"))
    assert rows in raw
    before = len(node.spool_files())
    rsp = _store(node, raw.replace(rows, explicit_element(0x0028, 0x0010, "LO", b"sixtyfour ")), ds.SOPClassUID, ds.SOPInstanceUID)
    _assert_refused(node, rsp, STATUS_CANNOT_UNDERSTAND, ds.SOPInstanceUID, before, "Rows is not a number")


def test_wrong_vr_unknown_vr_code_refused_cannot_understand(node: ListenerHandle) -> None:
    ds = image_dataset()
    raw = encode_dataset(ds)
    rows = explicit_element(0x0028, 0x0010, "US", (64).to_bytes(2, "little"))
    before = len(node.spool_files())
    rsp = _store(node, raw.replace(rows, explicit_element(0x0028, 0x0010, "XX", b"\x40\x00")), ds.SOPClassUID, ds.SOPInstanceUID)
    _assert_refused(node, rsp, STATUS_CANNOT_UNDERSTAND, ds.SOPInstanceUID, before, "not a readable DICOM")


def test_wrong_vr_binary_uid_refused_bad_uid(node: ListenerHandle) -> None:
    ds = image_dataset()
    raw = encode_dataset(ds)
    value = ds.SOPInstanceUID.encode()
    value += b"\x00" * (len(value) % 2)
    uid = explicit_element(0x0008, 0x0018, "UI", value)
    assert uid in raw
    before = len(node.spool_files())
    rsp = _store(node, raw.replace(uid, explicit_element(0x0008, 0x0018, "OB", b"\x01\x02/\x2e\x2e")), ds.SOPClassUID, ds.SOPInstanceUID)
    _assert_refused(node, rsp, STATUS_BAD_UID, ds.SOPInstanceUID, before, "SOPInstanceUID not a valid UID")


def test_wrong_vr_with_a_readable_value_is_tolerated_and_scored(node: ListenerHandle, detector) -> None:
    """Rows sent as UL instead of US: the value is still 64, so the object is stored and scored."""
    ds = image_dataset()
    raw = encode_dataset(ds)
    rows = explicit_element(0x0028, 0x0010, "US", (64).to_bytes(2, "little"))
    rsp = _store(node, raw.replace(rows, explicit_element(0x0028, 0x0010, "UL", (64).to_bytes(4, "little"))), ds.SOPClassUID, ds.SOPInstanceUID)
    assert int(rsp.Status) == STATUS_SUCCESS
    _process(node, detector)
    (row,) = _rows(node, ds.SOPInstanceUID)
    assert row["status"] == "analysed" and 0.0 <= row["score"] <= 1.0


# --------------------------------------------------------------------------- pixel data shorter than declared


def test_pixel_data_shorter_than_declared_accepted_then_failed(node: ListenerHandle, detector) -> None:
    ds = _short_pixels()
    rsp = _store(node, encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID)
    assert int(rsp.Status) == STATUS_SUCCESS  # well-formed encoding: only decoding finds the fault
    _assert_failed_without_score(node, detector, ds.SOPInstanceUID, "pixel data truncated")


def test_pixel_data_shorter_than_declared_through_dski_detect(detect_lines: dict[str, dict]) -> None:
    _assert_detect_error(detect_lines["short_pixels"], "pixel data truncated")
    assert 0.0 <= detect_lines["good"]["score"] <= 1.0  # the good file of the same run was scored


# --------------------------------------------------------------------------- BitsAllocated mismatch


def test_bits_allocated_larger_than_the_data_accepted_then_failed(node: ListenerHandle, detector) -> None:
    ds = _bits_allocated(32)  # 16-bit samples on the wire, 32 declared: half the bytes expected
    rsp = _store(node, encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID)
    assert int(rsp.Status) == STATUS_SUCCESS
    _assert_failed_without_score(node, detector, ds.SOPInstanceUID, "pixel data truncated")


def test_bits_allocated_not_a_valid_size_accepted_then_failed(node: ListenerHandle, detector) -> None:
    ds = _bits_allocated(12)
    rsp = _store(node, encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID)
    assert int(rsp.Status) == STATUS_SUCCESS
    _assert_failed_without_score(node, detector, ds.SOPInstanceUID, "unsupported BitsAllocated 12")


def test_bits_allocated_smaller_than_the_data_accepted_then_failed(node: ListenerHandle, detector) -> None:
    ds = _bits_allocated(8)  # 16-bit samples on the wire, 8 declared: twice the bytes expected
    rsp = _store(node, encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID)
    assert int(rsp.Status) == STATUS_SUCCESS
    _assert_failed_without_score(node, detector, ds.SOPInstanceUID, "header and data disagree")


def test_bits_allocated_mismatch_through_dski_detect(detect_lines: dict[str, dict]) -> None:
    _assert_detect_error(detect_lines["bits_allocated_32"], "pixel data truncated")
    _assert_detect_error(detect_lines["bits_allocated_12"], "unsupported BitsAllocated 12")


# --------------------------------------------------------------------------- unsupported transfer syntax


def test_unknown_transfer_syntax_refused_at_negotiation(node: ListenerHandle) -> None:
    ds = image_dataset()
    with RawSCU(node.port, [(ds.SOPClassUID, [UNKNOWN_TS]), (Verification, [ExplicitVRLittleEndian])]) as scu:
        assert scu.established  # the Verification context is accepted ...
        (storage_cx,) = [cx for cx in scu.assoc.rejected_contexts if cx.abstract_syntax == ds.SOPClassUID]
        # ... the storage context is not: result 4, "transfer syntaxes not supported" (PS3.8 9.3.3.2)
        assert storage_cx.result == 0x04
        assert not [cx for cx in scu.assoc.accepted_contexts if cx.abstract_syntax == ds.SOPClassUID]
        assert scu.echo() == STATUS_SUCCESS


def test_undecodable_transfer_syntax_accepted_as_sent_then_failed(node: ListenerHandle, detector) -> None:
    ds = _jpeg_xl()
    rsp = _store(node, encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID, JPEG_XL_LOSSLESS)
    assert int(rsp.Status) == STATUS_SUCCESS  # stored as sent, for the record; the node cannot score it
    (row,) = _rows(node, ds.SOPInstanceUID)
    assert row["transfer_syntax_uid"] == JPEG_XL_LOSSLESS
    _assert_failed_without_score(node, detector, ds.SOPInstanceUID, "is not supported")


def test_undecodable_transfer_syntax_through_dski_detect(detect_lines: dict[str, dict]) -> None:
    _assert_detect_error(detect_lines["jpeg_xl"], "JPEG XL Lossless")


# --------------------------------------------------------------------------- decompression bomb


def test_decompression_bomb_refused_before_anything_is_decoded(node: ListenerHandle) -> None:
    ds = _bomb()
    payload = encode_dataset(ds)
    assert len(payload) < 2000  # 4.3e12 pixels declared by a data set of a few hundred bytes
    before_rss, before_files = rss_kib(), len(node.spool_files())
    started = time.monotonic()
    rsp = _store(node, payload, ds.SOPClassUID, ds.SOPInstanceUID, RLELossless)
    elapsed = time.monotonic() - started
    _assert_refused(node, rsp, STATUS_TOO_LARGE, ds.SOPInstanceUID, before_files, "exceeds the limit")
    assert elapsed < 2.0
    assert rss_kib() - before_rss < 50 * 1024  # decoding one frame would take 8 GiB


def test_decompression_bomb_over_a_tiny_configured_limit(tmp_path: Path) -> None:
    """listener.max_pixels is what counts: 64 x 64 x 2 frames against a limit of 4095 pixels."""
    small = start_listener(tmp_path, max_pixels=4095)
    try:
        ds = image_dataset()
        ds.NumberOfFrames = 2
        rsp = _store(small, encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID)
        _assert_refused(small, rsp, STATUS_TOO_LARGE, ds.SOPInstanceUID, 0, "64x64x2 exceeds the limit of 4095")
        ok = image_dataset(rows=63, columns=65)  # 4095 pixels: at the limit, accepted
        assert int(_store(small, encode_dataset(ok), ok.SOPClassUID, ok.SOPInstanceUID).Status) == STATUS_SUCCESS
    finally:
        small.stop()


def test_decompression_bomb_refused_by_the_detector_without_decoding(files: dict[str, Path], monkeypatch) -> None:
    """The detector's own limit (PreprocessConfig.max_pixels) is checked before a decoder is even looked up."""
    import detector.pixels as pixels
    from detector.errors import ImageTooLargeError
    from detector.preprocess import PreprocessConfig, prepare_file

    def no_decoding(*args, **kwargs):
        raise AssertionError("a decoder was requested for a bomb")

    monkeypatch.setattr(pixels, "get_decoder", no_decoding)
    before = rss_kib()
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        prepare_file(files["bomb"], PreprocessConfig())
    # and a normal-sized image over a tiny limit, the same way
    with pytest.raises(ImageTooLargeError, match="over the limit of 100"):
        prepare_file(files["good"], PreprocessConfig(max_pixels=100))
    assert rss_kib() - before < 50 * 1024


def test_decompression_bomb_through_dski_detect(detect_lines: dict[str, dict]) -> None:
    _assert_detect_error(detect_lines["bomb"], "over the limit")


# --------------------------------------------------------------------------- hostile UIDs

HOSTILE_UIDS = {
    "path-separator": "1.2/3.4",
    "dot-dot": "../../etc/passwd",
    "dot-dot-in-uid": "1.2.840..10008",
    "backslash-multi-value": "1.2.3\\1.2.4",
    "overlong": "1.2.3" + ".4" * 40,  # 85 characters, UIDs are at most 64
    "non-digits": "1.2.abc.4",
    "leading-dot": ".1.2.3",
    "nul-inside": "1.2\x003.4",
}


@pytest.mark.parametrize("keyword", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
@pytest.mark.parametrize("name", list(HOSTILE_UIDS))
def test_hostile_uid_refused_bad_uid(node: ListenerHandle, keyword: str, name: str) -> None:
    ds = image_dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        setattr(ds, keyword, HOSTILE_UIDS[name])
        payload = encode_dataset(ds)
    command_uid = ds.SOPInstanceUID if keyword != "SOPInstanceUID" else generate_uid()
    tree_before = {p for p in node.spool.root.parent.rglob("*")}
    rsp = _store(node, payload, ds.SOPClassUID, command_uid)
    assert int(rsp.Status) == STATUS_BAD_UID, rsp
    assert keyword in str(rsp.ErrorComment)
    assert _rows(node, command_uid) == [] and _rows(node, str(ds.SOPInstanceUID)) == []
    # nothing was created anywhere: no spool file, no path built from the UID
    assert {p for p in node.spool.root.parent.rglob("*") if not p.name.startswith("dski.sqlite3")} == {
        p for p in tree_before if not p.name.startswith("dski.sqlite3")
    }


# --------------------------------------------------------------------------- non-image classes


@pytest.mark.parametrize(("make", "sop_class", "reason"), [
    (sr_dataset, ComprehensiveSRStorage, "structured report"),
    (pdf_dataset, EncapsulatedPDFStorage, "encapsulated document"),
])
def test_non_image_class_stored_as_skipped_never_scored(node: ListenerHandle, detector, make, sop_class, reason) -> None:
    ds = make()
    rsp = _store(node, encode_dataset(ds), sop_class, ds.SOPInstanceUID)
    assert int(rsp.Status) == STATUS_SUCCESS  # kept for the record, as sent
    _process(node, detector)
    (row,) = _rows(node, ds.SOPInstanceUID)
    assert row["status"] == "skipped"
    assert reason in row["status_reason"]
    assert row["verdict_id"] is None


def test_non_image_class_through_dski_detect(detect_lines: dict[str, dict]) -> None:
    _assert_detect_error(detect_lines["sr"], "no Pixel Data element")


# --------------------------------------------------------------------------- zero-length data set


def test_zero_length_dataset_refused_cannot_understand(node: ListenerHandle) -> None:
    uid = generate_uid()
    before = len(node.spool_files())
    rsp = _store(node, b"", "1.2.840.10008.5.1.4.1.1.2", uid)
    _assert_refused(node, rsp, STATUS_CANNOT_UNDERSTAND, uid, before, "empty data set")


def test_zero_length_file_through_dski_detect(detect_lines: dict[str, dict]) -> None:
    _assert_detect_error(detect_lines["zero"], "file is empty")
    assert "score" not in detect_lines["meta_only"]


# --------------------------------------------------------------------------- afterwards


def test_listener_still_serves_after_the_hostile_input(node: ListenerHandle) -> None:
    with RawSCU(node.port, all_contexts((ExplicitVRLittleEndian,))) as scu:
        assert scu.echo() == STATUS_SUCCESS
        ds = image_dataset()
        assert int(scu.store_raw(encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID).Status) == STATUS_SUCCESS
