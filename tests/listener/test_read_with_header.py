"""listener.spool_decode.read_with_header: one parse gives what two gave before.

The worker used to read each spool file twice: ``dcmread`` of the whole file, and again up
to the Pixel Data for the header the SR builder keeps. ``read_with_header`` reads the
header, then the rest from where it ended. Here both are compared on every file of
pydicom's test data that ``dcmread`` opens: every transfer syntax it ships (implicit and
explicit, big endian, deflated, JPEG, JPEG 2000, RLE, ...), with and without pixel data.
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import DeflatedExplicitVRLittleEndian

from listener.spool_decode import read_with_header


def _two_parses(raw: bytes) -> tuple[object, bytes | None]:
    """What the worker did before: the whole file, then its bytes up to the Pixel Data."""
    ds = dcmread(io.BytesIO(raw))
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return ds, None
    stream = io.BytesIO(raw)
    dcmread(stream, stop_before_pixels=True)
    return ds, raw[: stream.tell()]


def dicom_test_files() -> list[Path]:
    """pydicom's own test files that dcmread opens (also used by test_decode_pool)."""
    # the files pydicom ships, globbed directly: get_testdata_files() also tries to download
    # pydicom-data, which hangs without a network
    local = Path(pydicom.data.__file__).parent / "test_files"
    found = []
    for path in sorted(p for p in local.rglob("*") if p.is_file() and p.suffix != ".py"):
        if path.stat().st_size > 8_000_000:  # a few large files add time, not cases
            continue
        try:
            dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, NotImplementedError, TypeError, AttributeError):
            continue
        found.append(path)
    return found


_FILES = dicom_test_files()


def test_there_are_files_of_many_kinds() -> None:
    syntaxes = {str(dcmread(p, stop_before_pixels=True).file_meta.get("TransferSyntaxUID")) for p in _FILES}
    assert len(_FILES) >= 50 and len(syntaxes) >= 10, (len(_FILES), syntaxes)


@pytest.mark.parametrize("path", _FILES, ids=lambda p: p.name)
def test_one_parse_gives_the_data_set_and_header_of_two(path: Path) -> None:
    raw = path.read_bytes()
    try:
        expected_ds, expected_header = _two_parses(raw)
        _ = list(expected_ds)  # element conversion errors belong to the file, not to the comparison
    except Exception as exc:  # noqa: BLE001 - a file the old path could not read either
        pytest.skip(f"dcmread cannot read it whole: {type(exc).__name__}")
    ds, header = read_with_header(raw)
    assert header == expected_header
    assert ds == expected_ds
    assert ds.file_meta == expected_ds.file_meta
    assert ds.original_encoding == expected_ds.original_encoding
    if "PixelData" in expected_ds:
        assert ds.PixelData == expected_ds.PixelData
        assert header is None or raw[len(header):len(header) + 4] in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
