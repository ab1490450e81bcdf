"""Which SOP classes the detector scores, and the node's own reports."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom.presentation import AllStoragePresentationContexts

from listener.classify import (
    OWN_REPORT_REASON,
    Classifier,
    classify,
    classify_sop_class,
)
from listener.config import ReportConfig

CFG = ReportConfig()


@pytest.mark.parametrize(
    "uid",
    [
        "1.2.840.10008.5.1.4.1.1.2",  # CT
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
        "1.2.840.10008.5.1.4.1.1.4",  # MR
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
        "1.2.840.10008.5.1.4.1.1.1",  # CR
        "1.2.840.10008.5.1.4.1.1.1.1",  # DX
        "1.2.840.10008.5.1.4.1.1.1.2",  # MG
        "1.2.840.10008.5.1.4.1.1.13.1.3",  # breast tomosynthesis
        "1.2.840.10008.5.1.4.1.1.6.1",  # US
        "1.2.840.10008.5.1.4.1.1.3.1",  # US multi-frame
        "1.2.840.10008.5.1.4.1.1.128",  # PET
        "1.2.840.10008.5.1.4.1.1.20",  # NM
        "1.2.840.10008.5.1.4.1.1.12.1",  # XA
        "1.2.840.10008.5.1.4.1.1.7",  # secondary capture
        "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image: an image inside the RT family
        "1.2.840.10008.5.1.4.1.1.77.1.6",  # whole slide microscopy
        "1.2.840.10008.5.1.4.1.1.77.1.5.1",  # ophthalmic photography
    ],
)
def test_image_classes_are_analysed(uid: str) -> None:
    c = classify_sop_class(uid)
    assert c.kind == "image" and c.analyse, c


@pytest.mark.parametrize(
    ("uid", "word"),
    [
        ("1.2.840.10008.5.1.4.1.1.88.11", "structured report"),  # Basic Text SR
        ("1.2.840.10008.5.1.4.1.1.88.33", "structured report"),  # Comprehensive SR
        ("1.2.840.10008.5.1.4.1.1.88.34", "structured report"),  # Comprehensive 3D SR
        ("1.2.840.10008.5.1.4.1.1.88.67", "structured report"),  # dose SR
        ("1.2.840.10008.5.1.4.1.1.88.59", "key object selection"),
        ("1.2.840.10008.5.1.4.1.1.11.1", "presentation state"),  # GSPS
        ("1.2.840.10008.5.1.4.1.1.11.2", "presentation state"),
        ("1.2.840.10008.5.1.4.1.1.481.2", "radiotherapy"),  # RT Dose
        ("1.2.840.10008.5.1.4.1.1.481.3", "radiotherapy"),  # RT Structure Set
        ("1.2.840.10008.5.1.4.1.1.481.5", "radiotherapy"),  # RT Plan
        ("1.2.840.10008.5.1.4.1.1.481.4", "radiotherapy"),  # RT Beams Treatment Record
        ("1.2.840.10008.5.1.4.34.7", "radiotherapy"),  # RT Beams Delivery Instruction
        ("1.2.840.10008.5.1.4.1.1.9.1.1", "waveform"),  # 12-lead ECG
        ("1.2.840.10008.5.1.4.1.1.9.4.1", "waveform"),  # audio
        ("1.2.840.10008.5.1.4.1.1.104.1", "encapsulated"),  # PDF
        ("1.2.840.10008.5.1.4.1.1.104.2", "encapsulated"),  # CDA
        ("1.2.840.10008.5.1.4.1.1.104.3", "encapsulated"),  # STL
        ("1.2.840.10008.5.1.4.1.1.66", "raw data"),
        ("1.2.840.10008.5.1.4.1.1.66.1", "registration"),
        ("1.2.840.10008.5.1.4.1.1.66.4", "segmentation"),
        ("1.2.840.10008.5.1.4.1.1.4.2", "spectroscopy"),
        ("1.2.840.10008.5.1.4.1.1.30", "parametric map"),
        ("1.2.840.10008.5.1.4.1.1.78.1", "measurements"),
    ],
)
def test_non_image_classes_are_skipped_with_reason(uid: str, word: str) -> None:
    c = classify_sop_class(uid)
    assert c.kind == "non-image" and not c.analyse
    assert word in c.reason
    assert c.reason.startswith("non-image SOP class")


def test_every_storage_class_gets_a_decision() -> None:
    for cx in AllStoragePresentationContexts:
        c = classify_sop_class(cx.abstract_syntax)
        assert c.kind in ("image", "non-image") and c.reason


def test_unknown_classes_depend_on_image_attributes() -> None:
    private = "1.2.3.4.5.6.7"
    assert classify_sop_class(private).kind == "non-image"
    assert "without Rows/Columns" in classify_sop_class(private).reason
    assert classify_sop_class(private, has_image_attributes=True).kind == "image"
    assert classify_sop_class("").reason == "no SOP Class UID"
    assert classify_sop_class(None).kind == "non-image"


def _sr_header(**attrs: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.Modality = "SR"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def test_own_report_by_manufacturer() -> None:
    c = classify(_sr_header(Manufacturer=CFG.manufacturer), CFG)
    assert (c.kind, c.reason, c.analyse) == ("own-report", OWN_REPORT_REASON, False)


def test_own_report_by_private_coding_scheme_even_with_another_manufacturer() -> None:
    scheme = Dataset()
    scheme.CodingSchemeDesignator = "99DSKI"
    c = classify(_sr_header(Manufacturer="Renamed by PACS", CodingSchemeIdentificationSequence=[scheme]), CFG)
    assert c.kind == "own-report"


def test_foreign_sr_is_non_image_not_own() -> None:
    ds = pydicom.dcmread(get_testdata_file("test-SR.dcm"), stop_before_pixels=True)
    c = classify(ds, CFG)
    assert c.kind == "non-image"
    assert "structured report" in c.reason


def test_our_manufacturer_on_an_image_is_still_an_image() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    ds.Manufacturer = CFG.manufacturer
    assert classify(ds, CFG).kind == "image"


def test_a_real_report_is_recognised(tmp_path) -> None:
    """An SR built by listener.report, read back header-only as the listener reads it."""
    from listener.report import AlgorithmInfo, ReportItem, build_report
    from listener.header import HEADER_TAGS

    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    sr = build_report(
        [ReportItem(dataset=source, score=0.2, label="real", threshold=0.5)],
        algorithm=AlgorithmInfo(name="DSKI", version="0.1.0", model_version="dski@0.1.0+abc"),
        cfg=CFG,
        scope="series",
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
    assert classify(header, CFG).kind == "own-report"
    # also when the PACS rewrote the Manufacturer: the private coding scheme still marks it
    header.Manufacturer = "SOMEONE"
    assert classify(header, ReportConfig(manufacturer="Another Node")).kind == "own-report"


def _header(sop_class: str, *, image: bool, **attrs: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    if image:
        ds.Rows, ds.Columns = 8, 8
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def test_classifier_decides_as_classify_and_remembers_a_bounded_number_of_classes() -> None:
    classifier = Classifier(CFG, max_classes=4)
    headers = [_header(cx.abstract_syntax, image=image)
               for cx in AllStoragePresentationContexts for image in (False, True)]
    headers += [_header("1.2.3.4.5.6.7", image=True), _header("1.2.3.4.5.6.7", image=False)]  # private class
    for _ in range(2):  # the second pass answers from what the first remembered
        for ds in headers:
            assert classifier(ds) == classify(ds, CFG)
    assert len(classifier._decided) == 4  # noqa: SLF001 - the bound itself is the point


def test_classifier_checks_for_its_own_report_every_time() -> None:
    classifier = Classifier(CFG)
    foreign = _header("1.2.840.10008.5.1.4.1.1.88.34", image=False, Modality="SR", Manufacturer="Other")
    own = _header("1.2.840.10008.5.1.4.1.1.88.34", image=False, Modality="SR", Manufacturer=CFG.manufacturer)
    assert classifier(foreign).kind == "non-image"
    assert classifier(own).kind == "own-report"  # same SOP class, decided from the header again
    assert classifier(foreign).kind == "non-image"
