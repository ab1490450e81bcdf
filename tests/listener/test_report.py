"""The SR: validity against real tools (dciodvfy, dsrdump), determinism, character sets."""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from listener import uids
from listener.config import ReportConfig
from listener.report import (
    PRIVATE_SCHEME,
    AlgorithmInfo,
    ReportError,
    ReportItem,
    build_report,
    is_own_report,
    report_file_name,
    write_report,
)
from tests.peers import dciodvfy_errors, dciodvfy_warnings, run_dsr2html, run_dsrdump

ALGO = AlgorithmInfo(name="DSKI", version="1.2.0", model_version="dski-default@1.2.0+0123456789ab")
CFG = ReportConfig(institution_name="Test Hospital")
STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.1.1"


def _ct_small() -> Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def _mr_small() -> Dataset:
    return pydicom.dcmread(get_testdata_file("MR_small.dcm"))


def synthetic_ct(index: int, *, study: str = STUDY, series: str = SERIES, name: str = "Doe^Jane") -> Dataset:
    """A CT header (no pixel data: the report never needs it)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"{series}.{index}"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = f"{study}.99"
    ds.Modality = "CT"
    ds.PatientName = name
    ds.PatientID = "P123"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PatientWeight = "0"
    ds.StudyDate = "20250101"
    ds.StudyTime = "120000"
    ds.StudyID = "S1"
    ds.AccessionNumber = "A1"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 3
    ds.InstanceNumber = index
    ds.Rows = 64
    ds.Columns = 64
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = "1.0"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, float(index)]
    return ds


def items_for(datasets, scores=None, threshold=0.5) -> list[ReportItem]:
    scores = scores or [round(0.1 + 0.8 * i / max(1, len(datasets) - 1), 6) for i in range(len(datasets))]
    return [
        ReportItem(dataset=ds, score=s, label="fake" if s >= threshold else "real", threshold=threshold)
        for ds, s in zip(datasets, scores)
    ]


def content_items(ds: Dataset):
    """Every content item of the SR tree, depth first."""
    stack = list(reversed(ds.ContentSequence))
    while stack:
        item = stack.pop()
        yield item
        stack.extend(reversed(item.get("ContentSequence") or []))


def concept(item: Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return (code.CodeValue, code.CodingSchemeDesignator)


def measurement_groups(ds: Dataset) -> list[Dataset]:
    return [i for i in content_items(ds) if i.ValueType == "CONTAINER" and concept(i) == ("125007", "DCM")]


def group_probability(group: Dataset) -> float:
    for item in group.ContentSequence:
        if item.ValueType == "NUM" and concept(item) == ("122157", "DCM"):
            mv = item.MeasuredValueSequence[0]
            return float(mv.FloatingPointValue if "FloatingPointValue" in mv else mv.NumericValue)
    raise AssertionError("no probability in group")


def group_verdict(group: Dataset) -> str:
    for item in group.ContentSequence:
        if item.ValueType == "CODE" and concept(item) == ("AIG000", PRIVATE_SCHEME):
            return item.ConceptCodeSequence[0].CodeValue
    raise AssertionError("no verdict in group")


def group_source_uid(group: Dataset) -> str | None:
    for item in group.ContentSequence:
        if item.ValueType == "IMAGE":
            return item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    return None


def check_valid(path: Path, strict_warnings: bool = True) -> list[str]:
    """No dciodvfy error, dsrdump parses it; with ``strict_warnings`` the only warning
    allowed is the expected one about our private coding scheme (values copied from a
    real source can carry the source's own oddities, hence the switch)."""
    errors = dciodvfy_errors(path)
    assert errors == [], "\n".join(errors)
    warnings = dciodvfy_warnings(path)
    if strict_warnings:
        unexpected = [w for w in warnings if PRIVATE_SCHEME not in w]
        assert unexpected == [], "\n".join(unexpected)
    dump = run_dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    return warnings


# --------------------------------------------------------------------------- validity


@pytest.mark.parametrize("loader", [_ct_small, _mr_small], ids=["CT_small", "MR_small"])
def test_sr_from_pydicom_test_file_is_valid(tmp_path, loader):
    source = loader()
    sr = build_report(items_for([source], [0.87654321]), algorithm=ALGO, cfg=CFG, scope="series")
    path = write_report(sr, tmp_path)
    check_valid(path, strict_warnings=False)  # MR_small has a retired PN form in Physician(s) Reading Study
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.PatientID == source.PatientID
    assert sr.PatientName == source.PatientName
    assert sr.SeriesNumber == CFG.series_number
    assert sr.SeriesDescription == CFG.series_description
    assert sr.Manufacturer == CFG.manufacturer
    assert sr.InstitutionName == "Test Hospital"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"


def test_synthetic_series_is_valid_and_complete(tmp_path):
    sources = [synthetic_ct(i) for i in range(1, 6)]
    scores = [0.01, 0.49, 0.5, 0.731, 0.999999]
    sr = build_report(items_for(sources, scores), algorithm=ALGO, cfg=CFG, scope="series")
    path = write_report(sr, tmp_path)
    warnings = check_valid(path)
    assert all(PRIVATE_SCHEME in w for w in warnings)

    back = pydicom.dcmread(path)
    groups = measurement_groups(back)
    assert len(groups) == 1 + len(sources)  # summary + one per image
    per_image = {group_source_uid(g): g for g in groups if group_source_uid(g)}
    assert set(per_image) == {s.SOPInstanceUID for s in sources}
    for source, score in zip(sources, scores):
        group = per_image[source.SOPInstanceUID]
        assert group_probability(group) == score
        assert group_verdict(group) == ("AIG001" if score >= 0.5 else "AIG002")

    summary = next(g for g in groups if group_source_uid(g) is None)
    nums = {item.ConceptNameCodeSequence[0].CodeValue: item for item in summary.ContentSequence if item.ValueType == "NUM"}
    assert float(nums["AIG101"].MeasuredValueSequence[0].NumericValue) == 5
    assert float(nums["AIG102"].MeasuredValueSequence[0].NumericValue) == 3
    assert group_probability(summary) == max(scores)
    assert group_verdict(summary) == "AIG001"

    library = [i for i in content_items(back) if i.ValueType == "IMAGE" and concept(i) == ("260753009", "SCT")]
    assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in library} == {s.SOPInstanceUID for s in sources}


def test_algorithm_identification_and_observer(tmp_path):
    sr = build_report(items_for([synthetic_ct(1)]), algorithm=ALGO, cfg=CFG, scope="series")
    texts = {concept(i): i.get("TextValue") for i in content_items(sr) if i.ValueType == "TEXT"}
    assert texts[("111001", "DCM")] == "DSKI"
    assert texts[("111003", "DCM")] == "1.2.0"
    assert texts[("121013", "DCM")] == CFG.device_name
    assert texts[("121014", "DCM")] == CFG.manufacturer
    codes_ = {concept(i): i.ConceptCodeSequence[0].CodeValue for i in content_items(sr) if i.ValueType == "CODE"}
    assert codes_[("111000", "DCM")] == "123110"  # Algorithm Family: Artificial Intelligence
    assert codes_[("121005", "DCM")] == "121007"  # Observer Type: Device
    params = [i.TextValue for i in content_items(sr) if i.ValueType == "TEXT" and concept(i) == ("111002", "DCM")]
    assert f"model_version={ALGO.model_version}" in params
    schemes = [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence]
    assert PRIVATE_SCHEME in schemes
    assert all(i.ContinuityOfContent == "SEPARATE" for i in content_items(sr) if i.ValueType == "CONTAINER")


def test_dsr2html_shows_the_verdict(tmp_path):
    sr = build_report(items_for([synthetic_ct(1)], [0.9]), algorithm=ALGO, cfg=CFG, scope="series")
    html = run_dsr2html(write_report(sr, tmp_path))
    assert html.returncode == 0, html.stderr
    assert "AI-generated image suspected" in html.stdout
    assert "AI generation assessment" in html.stdout


def test_evidence_references_every_source():
    sources = [synthetic_ct(i) for i in range(1, 4)]
    sr = build_report(items_for(sources), algorithm=ALGO, cfg=CFG, scope="series")
    evidence = sr.CurrentRequestedProcedureEvidenceSequence
    assert len(evidence) == 1 and evidence[0].StudyInstanceUID == STUDY
    referenced = {
        (series.SeriesInstanceUID, sop.ReferencedSOPInstanceUID, sop.ReferencedSOPClassUID)
        for series in evidence[0].ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert referenced == {(SERIES, s.SOPInstanceUID, CTImageStorage) for s in sources}
    assert "PertinentOtherEvidenceSequence" not in sr


def test_study_scope_covers_several_series(tmp_path):
    other = SERIES + ".2"
    sources = [synthetic_ct(1), synthetic_ct(2), synthetic_ct(1, series=other)]
    sr = build_report(items_for(sources), algorithm=ALGO, cfg=CFG, scope="study")
    check_valid(write_report(sr, tmp_path))
    series = {s.SeriesInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence}
    assert series == {SERIES, other}
    assert sr.SOPInstanceUID == uids.report_uid(None, STUDY, [s.SOPInstanceUID for s in sources], ALGO.model_version)
    with pytest.raises(ReportError, match="series"):
        build_report(items_for(sources), algorithm=ALGO, cfg=CFG, scope="series")


def test_items_from_several_studies_are_refused():
    sources = [synthetic_ct(1), synthetic_ct(2, study=STUDY + ".7", series=SERIES + ".7")]
    with pytest.raises(ValueError, match="2 studies"):
        build_report(items_for(sources), algorithm=ALGO, cfg=CFG, scope="study")


@pytest.mark.parametrize(
    "item, match",
    [
        (ReportItem(synthetic_ct(1), 1.5, "fake", 0.5), "score"),
        (ReportItem(synthetic_ct(1), float("nan"), "fake", 0.5), "score"),
        (ReportItem(synthetic_ct(1), 0.5, "maybe", 0.5), "label"),
        (ReportItem(synthetic_ct(1), 0.5, "fake", -0.1), "threshold"),
    ],
)
def test_bad_items_are_refused(item, match):
    with pytest.raises(ReportError, match=match):
        build_report([item], algorithm=ALGO, cfg=CFG, scope="series")


def test_empty_and_duplicate_items_are_refused():
    with pytest.raises(ReportError):
        build_report([], algorithm=ALGO, cfg=CFG, scope="series")
    ds = synthetic_ct(1)
    with pytest.raises(ReportError, match="duplicate"):
        build_report(items_for([ds, copy.deepcopy(ds)]), algorithm=ALGO, cfg=CFG, scope="series")
    no_uid = synthetic_ct(1)
    del no_uid.SeriesInstanceUID
    with pytest.raises(ReportError, match="SeriesInstanceUID"):
        build_report(items_for([no_uid]), algorithm=ALGO, cfg=CFG, scope="series")


def test_sloppy_source_still_gives_a_valid_report(tmp_path):
    """Missing Type 2 patient/study attributes and a CT without Pixel Spacing."""
    ds = synthetic_ct(1)
    for keyword in ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        delattr(ds, keyword)
    del ds.PixelSpacing
    sr = build_report(items_for([ds, synthetic_ct(2)]), algorithm=ALGO, cfg=CFG, scope="series")
    # dciodvfy warns that the empty Study ID would be needed for a DICOMDIR: the source's gap.
    check_valid(write_report(sr, tmp_path), strict_warnings=False)


# --------------------------------------------------------------------------- determinism


def test_uid_is_deterministic_and_order_independent():
    sources = [synthetic_ct(i) for i in range(1, 5)]
    first = build_report(items_for(sources), algorithm=ALGO, cfg=CFG, scope="series", now=datetime(2025, 1, 1))
    again = build_report(items_for(sources), algorithm=ALGO, cfg=CFG, scope="series", now=datetime(2026, 2, 2))
    reordered_sources = list(reversed(sources))
    reordered = build_report(
        items_for(reordered_sources, [0.9, 0.633333, 0.366667, 0.1]), algorithm=ALGO, cfg=CFG, scope="series"
    )
    assert first.SOPInstanceUID == again.SOPInstanceUID == reordered.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID == reordered.SeriesInstanceUID
    assert first.SOPInstanceUID.startswith("2.25.") and len(first.SOPInstanceUID) <= 64
    # the content is in the same order whatever the input order
    assert [group_source_uid(g) for g in measurement_groups(first)] == [
        group_source_uid(g) for g in measurement_groups(reordered)
    ]

    other_model = AlgorithmInfo(ALGO.name, "1.3.0", "dski-default@1.3.0+fedcba987654")
    changed = build_report(items_for(sources), algorithm=other_model, cfg=CFG, scope="series")
    assert changed.SOPInstanceUID != first.SOPInstanceUID

    more = build_report(items_for(sources + [synthetic_ct(5)]), algorithm=ALGO, cfg=CFG, scope="series")
    assert more.SOPInstanceUID != first.SOPInstanceUID
    assert more.SeriesInstanceUID == first.SeriesInstanceUID  # late images: new report, same SR series


def test_uid_functions():
    sops = ["1.2.3.4", "1.2.3.5", "1.2.3.10"]
    uid = uids.report_uid("1.2.3", "1.2", sops, "m@1")
    assert uid == uids.report_uid("1.2.3", "1.2", list(reversed(sops)), "m@1")
    assert uid == uids.report_uid("1.2.3", "1.2", sops + ["1.2.3.4"], "m@1")  # duplicates do not count
    assert uid != uids.report_uid("1.2.3", "1.2", sops, "m@2")
    assert uid != uids.report_uid(None, "1.2", sops, "m@1")
    assert uid != uids.report_uid("1.2.3", "1.2", sops, "m@1", kind="ko")
    assert uid.startswith("2.25.") and len(uid) <= 64
    assert pydicom.uid.UID(uid).is_valid
    assert uids.report_series_uid("1.2", "1.2.3", "m@1") == uids.report_series_uid("1.2", "1.2.3", "m@1")
    assert uids.report_series_uid("1.2", "1.2.3", "m@1") != uids.report_series_uid("1.2", "1.2.4", "m@1")
    # a fixed namespace: the UID of a known input never changes between releases
    assert uids.report_uid("1.2.3", "1.2", sops, "m@1") == uids.derive_uid(
        "report/sr", "1.2", "1.2.3", "m@1", sorted(sops)
    )
    with pytest.raises(ValueError):
        uids.report_uid("1.2.3", "1.2", [], "m@1")
    with pytest.raises(ValueError):
        uids.report_uid("1.2.3", "", sops, "m@1")


# --------------------------------------------------------------------------- patient data


@pytest.mark.parametrize(
    "name",
    ["Yamada^Tarou=山田^太郎=やまだ^たろう", "Παπαδόπουλος^Γιώργος"],
    ids=["japanese", "greek"],
)
def test_non_latin_patient_name_uses_utf8_and_round_trips(tmp_path, name):
    sources = [synthetic_ct(i, name=name) for i in (1, 2)]
    sr = build_report(items_for(sources), algorithm=ALGO, cfg=CFG, scope="series")
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    path = write_report(sr, tmp_path)
    check_valid(path)
    back = pydicom.dcmread(path)
    assert back.SpecificCharacterSet == "ISO_IR 192"
    assert str(back.PatientName) == name
    dump = run_dsrdump(path)
    assert dump.returncode == 0


def test_source_in_iso_2022_is_recoded_to_utf8(tmp_path):
    """A Japanese source in ISO 2022 IR 87 decodes to text that must not be written as Latin-1."""
    ds = synthetic_ct(1)
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎"
    src = tmp_path / "src.dcm"
    ds.save_as(src, enforce_file_format=True)
    source = pydicom.dcmread(src)
    sr = build_report(items_for([source]), algorithm=ALGO, cfg=CFG, scope="series")
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    back = pydicom.dcmread(write_report(sr, tmp_path / "out"))
    assert str(back.PatientName) == "Yamada^Tarou=山田^太郎"


def test_non_latin_text_in_content_tree_round_trips(tmp_path):
    cfg = ReportConfig(device_name="ДСКИ узел", institution_name="Νοσοκομείο")
    sr = build_report(items_for([synthetic_ct(1)]), algorithm=ALGO, cfg=cfg, scope="series")
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    path = write_report(sr, tmp_path)
    check_valid(path)
    back = pydicom.dcmread(path)
    names = [i.TextValue for i in content_items(back) if i.ValueType == "TEXT" and concept(i) == ("121013", "DCM")]
    assert names == ["ДСКИ узел"]
    assert back.InstitutionName == "Νοσοκομείο"


def test_latin1_patient_name_stays_latin1(tmp_path):
    sr = build_report(items_for([synthetic_ct(1, name="Müller^Zoë")]), algorithm=ALGO, cfg=CFG, scope="series")
    assert sr.SpecificCharacterSet == "ISO_IR 100"
    back = pydicom.dcmread(write_report(sr, tmp_path))
    assert str(back.PatientName) == "Müller^Zoë"


def test_zero_patient_weight_is_removed():
    ct = _ct_small()
    assert float(ct.PatientWeight) == 0.0
    sr = build_report(items_for([ct]), algorithm=ALGO, cfg=CFG, scope="series")
    assert "PatientWeight" not in sr
    mr = _mr_small()
    sr = build_report(items_for([mr]), algorithm=ALGO, cfg=CFG, scope="series")
    assert float(sr.PatientWeight) == float(mr.PatientWeight) == 80.0


def test_source_is_not_modified():
    ds = synthetic_ct(1, name="Παπαδόπουλος^Γιώργος")  # the SR's character set differs from the source's
    before = copy.deepcopy(ds)
    sr = build_report(items_for([ds]), algorithm=ALGO, cfg=CFG, scope="series")
    assert sr.SpecificCharacterSet == "ISO_IR 192" and "PatientWeight" not in sr
    assert ds == before
    assert ds.SpecificCharacterSet == "ISO_IR 100" and ds.PatientWeight == "0"


# --------------------------------------------------------------------------- own reports, files


def test_is_own_report(tmp_path):
    sr = build_report(items_for([synthetic_ct(1)]), algorithm=ALGO, cfg=CFG, scope="series")
    assert is_own_report(sr)
    assert is_own_report(sr, CFG)
    header = pydicom.dcmread(write_report(sr, tmp_path), stop_before_pixels=True)
    assert is_own_report(header, CFG)
    assert not is_own_report(_ct_small(), CFG)
    assert not is_own_report(synthetic_ct(1))

    stripped = copy.deepcopy(sr)
    del stripped.CodingSchemeIdentificationSequence
    assert not is_own_report(stripped)
    assert is_own_report(stripped, CFG)  # Manufacturer + Series Description
    assert not is_own_report(stripped, ReportConfig(manufacturer="Someone else"))

    foreign = copy.deepcopy(stripped)
    foreign.Manufacturer = "Vendor X"
    assert not is_own_report(foreign, CFG)


def test_write_report_is_atomic_and_named_after_the_uid(tmp_path):
    sr = build_report(items_for([synthetic_ct(1)]), algorithm=ALGO, cfg=CFG, scope="series")
    out = tmp_path / "reports"
    path = write_report(sr, out)
    assert path == out / f"{sr.SOPInstanceUID}.dcm"
    again = write_report(sr, out)
    assert again == path
    assert sorted(p.name for p in out.iterdir()) == [path.name]  # no temporary files left
    back = pydicom.dcmread(path)
    assert back.SOPInstanceUID == sr.SOPInstanceUID
    assert back.file_meta.MediaStorageSOPInstanceUID == sr.SOPInstanceUID
    assert report_file_name("1.2/../3 4") == "1.2_.._3_4.dcm"
    with pytest.raises(ValueError):
        report_file_name("...")
