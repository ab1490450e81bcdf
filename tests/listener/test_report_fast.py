"""The fast SR path against the highdicom one: the same data set, element by element,
and the same file, byte for byte.

``build_report`` builds the content tree directly and ``write_report`` encodes it
itself (listener/report.py); ``build_report_highdicom`` and pydicom's writer are the
reference. Only the creation timestamps that highdicom takes from the clock
(Instance Creation Date/Time, Contribution DateTime) are set equal before comparing.
"""

from __future__ import annotations

import copy
import io
from datetime import datetime

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from listener.config import ReportConfig
from listener.report import (
    SOURCE_TAGS,
    ReportItem,
    build_report,
    build_report_highdicom,
    encode_report,
    report_order_key,
    write_report,
)
from tests.listener.test_report import (
    ALGO,
    CFG,
    SERIES,
    STUDY,
    check_valid,
    items_for,
    synthetic_ct,
)

NOW = datetime(2025, 3, 4, 5, 6, 7, 890000)


def _normalise(ds: Dataset) -> Dataset:
    ds.InstanceCreationDate = "20250101"
    ds.InstanceCreationTime = "000000"
    for item in ds.get("ContributingEquipmentSequence") or []:
        item.ContributionDateTime = "20250101000000"
    return ds


def both(items, *, cfg=CFG, scope="series") -> tuple[Dataset, Dataset]:
    fast = build_report(copy.deepcopy(items), algorithm=ALGO, cfg=cfg, scope=scope, now=NOW)
    reference = build_report_highdicom(copy.deepcopy(items), algorithm=ALGO, cfg=cfg, scope=scope, now=NOW)
    return _normalise(fast), _normalise(reference)


def assert_same(fast: Dataset, reference: Dataset, path: str = "SR") -> None:
    """Same tags, VRs, values and value types, recursively (sequence classes aside:
    highdicom's ContentSequence is a pydicom Sequence)."""
    assert sorted(fast.keys()) == sorted(reference.keys()), path
    for tag in reference.keys():  # noqa: SIM118 (iterating a Dataset gives elements)
        a, b = fast[tag], reference[tag]
        where = f"{path}.{b.keyword or b.tag}"
        assert a.VR == b.VR, where
        if b.VR == "SQ":
            assert isinstance(a.value, PydicomSequence), where
            assert len(a.value) == len(b.value), where
            for index, (x, y) in enumerate(zip(a.value, b.value)):
                assert_same(x, y, f"{where}[{index}]")
        else:
            assert a.value == b.value, where
            assert type(a.value) is type(b.value), where


def pydicom_bytes(ds: Dataset) -> bytes:
    ds = copy.deepcopy(ds)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def assert_equivalent(items, **kwargs) -> tuple[Dataset, Dataset]:
    fast, reference = both(items, **kwargs)
    assert_same(fast, reference)
    # the file: pydicom writes both the same, and the fast encoder writes what pydicom writes
    assert pydicom_bytes(fast) == pydicom_bytes(reference)
    assert encode_report(fast) == pydicom_bytes(reference)
    return fast, reference


def _ct_small_series(count: int) -> list[Dataset]:
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    out = []
    for index in range(1, count + 1):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = f"{SERIES}.{index}"
        ds.InstanceNumber = index
        ds.ImagePositionPatient = [-158.1, -179.0, -75.7 + 2.5 * index]
        out.append(ds)
    return out


def test_synthetic_series_of_60():
    sources = [synthetic_ct(i) for i in range(1, 61)]
    scores = [round((i * 37 % 100) / 100, 2) for i in range(60)]
    assert_equivalent(items_for(sources, scores))


def test_ct_small_series_from_file_headers():
    assert_equivalent(items_for(_ct_small_series(25)))


def test_pydicom_test_files():
    for name in ("CT_small.dcm", "MR_small.dcm"):
        source = pydicom.dcmread(get_testdata_file(name))
        assert_equivalent(items_for([source], [0.87654321]))


def test_mixed_thresholds_labels_and_missing_instance_numbers():
    sources = [synthetic_ct(i) for i in range(1, 9)]
    del sources[2].InstanceNumber
    sources[5].InstanceNumber = None
    items = [
        ReportItem(dataset=ds, score=s, label=lbl, threshold=t)
        for ds, s, lbl, t in zip(
            sources,
            [0.0, 1.0, 0.5, 0.25, 0.75, 0.123456789, 0.3, 0.99],
            ["real", "fake", "fake", "real", "fake", "real", "real", "fake"],
            [0.5, 0.5, 0.4, 0.4, 0.5, 0.5, 0.6, 0.6],
        )
    ]
    assert_equivalent(items)


def test_odd_sources_take_highdicoms_path_for_descriptors():
    """Each odd source alone and all together: what highdicom cannot describe gets the
    basic descriptors, and unusual values go through highdicom itself."""
    odd = [synthetic_ct(i) for i in range(1, 12)]
    del odd[0].PixelSpacing
    del odd[1].FrameOfReferenceUID
    odd[2].SpacingBetweenSlices = "1.5"
    odd[3].SliceThickness = None
    del odd[4].Rows
    odd[5].Modality = "OT"
    odd[6].SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    odd[6].Modality = "OT"
    odd[7].Modality = "CR"
    odd[7].SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    odd[7].PatientOrientation = ["A", "F"]
    odd[7].ImagerPixelSpacing = [0.1, 0.1]
    odd[8].SOPClassUID = "1.2.3.4.5"  # unknown SOP class
    odd[9].ImageOrientationPatient = [1, 0, 0]
    odd[10].PixelSpacing = "0.5"
    for ds in odd:
        assert_equivalent(
            items_for([synthetic_ct(0), ds])
        )  # a well-formed first source: highdicom reads the header from it
    assert_equivalent(items_for(odd))


def test_study_scope_with_several_series_and_frames_of_reference():
    sources = [synthetic_ct(i) for i in range(1, 4)]
    sources += [synthetic_ct(i, series=SERIES + ".2") for i in range(1, 4)]
    for ds in sources[3:]:
        ds.FrameOfReferenceUID = STUDY + ".98"
    sources.append(pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True))
    sources[-1].StudyInstanceUID = STUDY
    assert_equivalent(items_for(sources), scope="study")


@pytest.mark.parametrize("name", ["Müller^Zoë", "Παπαδόπουλος^Γιώργος", "Yamada^Tarou=山田^太郎"])
def test_character_sets(name):
    fast, _ = assert_equivalent(items_for([synthetic_ct(i, name=name) for i in (1, 2, 3)]))
    assert fast.SpecificCharacterSet == ("ISO_IR 100" if name == "Müller^Zoë" else "ISO_IR 192")


def test_non_latin_text_in_content_tree():
    cfg = ReportConfig(device_name="ДСКИ узел", institution_name="Νοσοκομείο")
    assert_equivalent(items_for([synthetic_ct(i) for i in (1, 2)]), cfg=cfg)


def test_200_images_equivalent_valid_and_fast(tmp_path):
    sources = _ct_small_series(200)
    items = items_for(sources)
    fast, _ = assert_equivalent(items)
    path = write_report(fast, tmp_path)
    check_valid(path, strict_warnings=False)  # CT_small's own attributes give dciodvfy warnings
    assert pydicom.dcmread(path).SOPInstanceUID == fast.SOPInstanceUID
    # Its speed (about 0.23 s of CPU against 9.8-11.7 s for the highdicom path) is measured by
    # benchmarks/e2e_latency.py and docs/performance.md, not asserted here: timings are no tests.


def test_shared_items_do_not_leak_between_reports():
    """Sharing is per report: a second report has none of the first one's content items
    (highdicom itself shares a few constant code items between documents)."""
    items = items_for([synthetic_ct(i) for i in (1, 2, 3)])
    first = build_report(items, algorithm=ALGO, cfg=CFG, scope="series", now=NOW)
    second = build_report(items, algorithm=ALGO, cfg=CFG, scope="series", now=NOW)

    def ids(ds: Dataset, out: set[int]) -> set[int]:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    if "ValueType" in item:
                        out.add(id(item))
                    ids(item, out)
        return out

    assert not (ids(first, set()) & ids(second, set()))


def test_sources_read_with_source_tags_give_the_same_report():
    """The scheduler parses only SOURCE_TAGS of every header but the first in report order."""
    sources = _ct_small_series(6) + [synthetic_ct(i) for i in (7, 8, 9)]
    sources[7].Modality = "CR"
    sources[7].SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    sources[7].PatientOrientation = ["A", "F"]
    sources[7].ImagerPixelSpacing = [0.1, 0.1]
    del sources[8].PixelSpacing
    for ds in sources:
        ds.StudyInstanceUID = STUDY
        ds.SeriesInstanceUID = SERIES
        ds.SOPInstanceUID = f"{SERIES}.{ds.InstanceNumber}"
    blobs = []
    for ds in sources:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        blobs.append(buffer.getvalue())
    full = [pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True) for b in blobs]
    partial = [pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True, specific_tags=list(SOURCE_TAGS)) for b in blobs]
    first = min(range(len(partial)), key=lambda i: report_order_key(partial[i]))
    partial[first] = full[first]
    scores = [0.1, 0.9, 0.3, 0.7, 0.5, 0.2, 0.8, 0.4, 0.6]
    a = _normalise(build_report(items_for(full, scores), algorithm=ALGO, cfg=CFG, scope="series", now=NOW))
    b = _normalise(build_report(items_for(partial, scores), algorithm=ALGO, cfg=CFG, scope="series", now=NOW))
    assert_same(b, a)
    assert encode_report(b) == encode_report(a)
