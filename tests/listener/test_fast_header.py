"""``parse_header`` (fast path with its fallback) gives what ``parse_header_reference`` gives.

Over every pydicom test file (as the listener receives it: preamble, File Meta with group
length, data set), re-encoded where pydicom can in both little endian transfer syntaxes,
and over random truncations and byte flips of each: the same ObjectHeader fields, the same
header values (with their types, VRs and offsets, and the data set's encoding), the same
classification, or the same InvalidObjectError status and reason.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from listener.classify import classify
from listener.config import ReportConfig
from listener.header import (
    HEADER_TAGS,
    InvalidObjectError,
    ObjectHeader,
    _fast_elements,
    parse_header,
    parse_header_reference,
)

_MAX_PIXELS = 10**12


def _test_files() -> list[Path]:
    folder = Path(pydicom.data.__file__).parent / "test_files"
    return sorted(p for p in folder.glob("*.dcm") if p.stat().st_size < 5_000_000)


def _encodings(path: Path) -> list[bytes]:
    """The file as received, and re-encoded in implicit and explicit VR little endian."""
    out = []
    try:
        ds = pydicom.dcmread(path)
    except Exception:  # noqa: BLE001 - files pydicom itself cannot read are not this test's subject
        return out
    for syntax in (None, ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        try:
            copy = ds.copy()
            if syntax is not None:
                if copy.file_meta.get("TransferSyntaxUID") not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
                    continue  # compressed or big endian pixel data: not re-encodable as is
                copy.file_meta.TransferSyntaxUID = syntax
            buf = BytesIO()
            copy.save_as(buf, enforce_file_format=True)
        except Exception:  # noqa: BLE001, S112 - not re-encodable: the other encodings are still compared
            continue
        out.append(buf.getvalue())
    return out


def _outcome(parse: Callable[..., ObjectHeader], data: bytes) -> tuple:
    try:
        header = parse(data, max_pixels=_MAX_PIXELS)
    except InvalidObjectError as exc:
        return ("refused", exc.status, exc.reason)
    values = tuple((k, header.dataset.get(k), _element_detail(header.dataset, k)) for k in HEADER_TAGS)
    encoding = (header.dataset._read_implicit, header.dataset._read_little, header.dataset.original_character_set)
    fields = (
        header.sop_class_uid, header.sop_instance_uid, header.study_instance_uid, header.series_instance_uid,
        header.transfer_syntax_uid, header.patient_id, header.modality, header.pixels,
    )
    cfg = ReportConfig()
    return ("accepted", fields, values, encoding, classify(header.dataset, cfg))


def _element_detail(ds: Dataset, keyword: str) -> tuple | None:
    """What else of a header element may differ between two equal values: types, VR, offset."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return None
    element = ds[tag]
    value = element.value
    types = [type(v).__name__ for v in value] if isinstance(value, MultiValue) else None
    return (type(value).__name__, types, element.VR, element.file_tell, element.is_undefined_length)


def _check(data: bytes) -> bool:
    """Asserts equal outcomes; returns whether the fast path took the object."""
    with warnings.catch_warnings():  # pydicom warns on odd values in both paths alike: not compared
        warnings.simplefilter("ignore")
        fast, reference = _outcome(parse_header, data), _outcome(parse_header_reference, data)
    assert fast == reference
    return _fast_elements(data) is not None


def test_every_test_file_gives_the_reference_outcome() -> None:
    fast = compared = 0
    for path in _test_files():
        for data in _encodings(path):
            fast += _check(data)
            compared += 1
    assert compared >= 100
    assert fast >= compared // 2  # the fast path is the common case, not a curiosity


@pytest.mark.parametrize("seed", range(4))
def test_truncated_and_damaged_files_give_the_reference_outcome(seed: int) -> None:
    rng = random.Random(seed)
    files = _test_files()
    for path in files[seed::4]:
        for data in _encodings(path)[:2]:
            for _ in range(4):
                _check(data[: rng.randrange(0, len(data))])
            for _ in range(3):
                damaged = bytearray(data)
                # damage the File Meta and the first elements, where the fast path decides
                for _ in range(rng.randint(1, 3)):
                    damaged[rng.randrange(128, min(len(data), 1200))] = rng.randrange(256)
                _check(bytes(damaged))


def test_the_benchmark_ct_takes_the_fast_path() -> None:
    path = Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm"
    for data in _encodings(path):
        assert _check(data)
