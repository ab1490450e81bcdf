"""listener.spool_decode.read_for_decoding: the elements decoding reads, without parsing the rest.

The oracle is the full parse (``read_with_header``) followed by the same ``decode_dataset``:
on every file of pydicom's test data that ``dcmread`` opens (every transfer syntax it ships,
palette colour, enhanced multi-frame objects, odd and broken headers) and on the benchmark's
CT instances, both give the same frames, the same metadata, or the same failure, and the
same header bytes for the SR builder.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from benchmarks.common import make_ct_instances
from detector.errors import PreprocessError
from detector.pixels import DecodeLimits, decode_dataset
from detector.preprocess import PreprocessConfig
from listener.spool_decode import read_for_decoding, read_with_header
from tests.detector.test_preprocess import enhanced_ds, make_ds
from tests.listener.test_read_with_header import dicom_test_files

_LIMITS: DecodeLimits = PreprocessConfig().decode_limits()


def _outcome(read, raw: bytes):  # type: ignore[no-untyped-def]
    """(header, decoded or the failure's reason, or the read's exception type)."""
    try:
        ds, header = read(raw)
    except Exception as exc:  # noqa: BLE001 - the two reads must fail alike
        return None, f"read failed: {type(exc).__name__}"
    try:
        return header, decode_dataset(ds, "SOP x", _LIMITS)
    except PreprocessError as exc:
        return header, exc.reason


def _assert_same(raw: bytes) -> None:
    expected_header, expected = _outcome(read_with_header, raw)
    header, got = _outcome(read_for_decoding, raw)
    assert header == expected_header
    if isinstance(expected, str):
        assert got == expected
        return
    assert not isinstance(got, str), got
    assert (got.source, got.modality, got.sop_instance_uid, got.frame_indices) == (
        expected.source, expected.modality, expected.sop_instance_uid, expected.frame_indices)
    assert len(got.frames) == len(expected.frames)
    for a, b in zip(got.frames, expected.frames, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("path", dicom_test_files(), ids=lambda p: p.name)
def test_the_same_frames_or_failure_as_the_full_parse(path: Path) -> None:
    _assert_same(path.read_bytes())


def test_the_benchmark_instances_take_the_short_read(tmp_path: Path) -> None:
    for path in make_ct_instances(tmp_path, 3):
        raw = path.read_bytes()
        _assert_same(raw)
        ds, _ = read_for_decoding(raw)
        # only what decoding reads was parsed: no patient or study element, no private group
        assert "PatientName" in read_with_header(raw)[0] and "PatientName" not in ds
        assert {elem.tag.group for elem in ds} <= {0x0008, 0x0028, 0x5200, 0x7FE0}


def test_files_the_walk_cannot_follow_are_read_whole(tmp_path: Path) -> None:
    raw = make_ct_instances(tmp_path, 1)[0].read_bytes()
    # truncated inside the pixel data, and a File Meta group without its group length
    for broken in (raw[:-100], raw[:132] + raw[144:]):
        _assert_same(broken)


def _file_bytes(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _enhanced() -> Dataset:
    """Two frames whose rescale and window come from the shared functional groups (5200)."""
    ds = enhanced_ds()
    ds.PatientName, ds.StudyDescription = "Doe^Jane", "not read by decoding"
    return ds


def _voi_lut() -> Dataset:
    ds = make_ds(np.arange(256, dtype=np.uint8).reshape(16, 16), Modality="CT")
    item = Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.LUTData = np.arange(255, -1, -1, dtype="<u2").tobytes()  # OW: written as bytes
    ds.VOILUTSequence = Sequence([item])
    return ds


@pytest.mark.parametrize("build", [_enhanced, _voi_lut], ids=lambda f: f.__name__.strip("_"))
def test_functional_groups_and_lookup_tables_are_read(build) -> None:  # type: ignore[no-untyped-def]
    raw = _file_bytes(build())
    _assert_same(raw)
    # the elements that change the frames were read by the short path, not by its fallback
    ds, _ = read_for_decoding(raw)
    assert "PatientName" not in ds
