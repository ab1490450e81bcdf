"""The receive path's shortcuts give what the general code gives.

- ``file_meta_bytes`` writes the File Meta header byte for byte as pynetdicom's
  ``Event.encoded_dataset`` (pydicom's writer) does.
- ``parse_header`` hands pydicom only the bytes up to the last header tag; on every
  pydicom test file that it accepts, the header equals a full read of the file.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from listener.header import HEADER_TAGS, InvalidObjectError, file_meta_bytes, parse_header


@pytest.mark.parametrize(
    "uids",
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even and odd lengths
        ("1.2.840.10008.5.1.4.1.1.7", "1.2.33", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.88.33", "2.25." + "9" * 59, "1.2.840.10008.1.2.4.50"),  # 64 characters
    ],
)
def test_file_meta_bytes_equal_pynetdicom(uids: tuple[str, str, str]) -> None:
    meta = create_file_meta(sop_class_uid=UID(uids[0]), sop_instance_uid=UID(uids[1]), transfer_syntax=UID(uids[2]))
    assert file_meta_bytes(*uids) == b"\x00" * 128 + b"DICM" + encode_file_meta(meta)


def _test_files() -> list[Path]:
    folder = Path(pydicom.data.__file__).parent / "test_files"
    return sorted(p for p in folder.glob("*.dcm") if p.stat().st_size < 5_000_000)


def _file_bytes(path: Path) -> bytes | None:
    """The file as the listener gets it: preamble, File Meta with group length, data set."""
    try:
        ds = pydicom.dcmread(path)
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    except Exception:  # noqa: BLE001 - files pydicom itself cannot round-trip are not this test's subject
        return None
    return buf.getvalue()


def test_header_from_the_prefix_equals_a_full_read() -> None:
    compared = 0
    for path in _test_files():
        data = _file_bytes(path)
        if data is None:
            continue
        try:
            header = parse_header(data, max_pixels=10**12)
        except InvalidObjectError:
            continue
        full = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
        for keyword in HEADER_TAGS:
            assert header.dataset.get(keyword) == full.get(keyword), (path.name, keyword)
        assert header.sop_instance_uid == str(full.SOPInstanceUID).rstrip("\x00 ")
        compared += 1
    assert compared >= 20


@pytest.mark.parametrize("name", ["waveform_ecg.dcm", "reportsi.dcm"])
def test_truncated_inside_a_sequence_after_the_header_tags_is_refused(name: str) -> None:
    # the sequence comes after (0028,0011): a data set cut inside it must not pass because
    # pydicom was handed only the bytes up to the header tags
    data = _file_bytes(Path(pydicom.data.__file__).parent / "test_files" / name)
    assert data is not None
    for cut in (len(data) - 7, len(data) - 100, (len(data) + 2000) // 2):
        with pytest.raises(InvalidObjectError):
            parse_header(data[:cut], max_pixels=10**12)
