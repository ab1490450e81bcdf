"""The DICOM Structured Report with the forensic verdict that radiologists see.

One report covers the analysed images of one series (or one study): a highdicom
``Comprehensive3DSR`` whose content is a TID 1500 Measurement Report with

- a device observer context naming the node,
- an Image Library (TID 1600) of every analysed image,
- a summary measurement group (images analysed, images suspected, highest probability,
  overall verdict),
- one measurement group (TID 1501) per image: tracking identifier, source image,
  algorithm identification (TID 4019), the probability of AI generation
  (DCM 122157 "Probability", UCUM "1") and the verdict as a qualitative evaluation.

There is no standard code for "AI-generated image", so the verdict uses the private
coding scheme :data:`PRIVATE_SCHEME` ("99DSKI"), declared in the Coding Scheme
Identification Sequence. The SR joins the source study in a new series; its UIDs come
from :mod:`listener.uids`, so building the same report twice gives the same UIDs.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import highdicom as hd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from listener import uids
from listener.config import ReportConfig

logger = logging.getLogger(__name__)

PRIVATE_SCHEME = "99DSKI"
PRIVATE_SCHEME_NAME = "DSKI Node forensic codes"

# Concept name of the verdict and its two values.
CODE_AI_GENERATION_ASSESSMENT = Code("AIG000", PRIVATE_SCHEME, "AI generation assessment")
CODE_AI_GENERATION_SUSPECTED = Code("AIG001", PRIVATE_SCHEME, "AI-generated image suspected")
CODE_NO_AI_GENERATION_DETECTED = Code("AIG002", PRIVATE_SCHEME, "No AI generation detected")
# Summary measurements.
CODE_IMAGES_ANALYSED = Code("AIG101", PRIVATE_SCHEME, "Images analysed")
CODE_IMAGES_SUSPECTED = Code("AIG102", PRIVATE_SCHEME, "Images with AI generation suspected")

UNIT_IMAGES = Code("{images}", "UCUM", "images")
PROCEDURE_REPORTED = codes.SCT.ImagingProcedure  # SCT 363679005, CID 100
SUMMARY_TRACKING_IDENTIFIER = "DSKI summary"

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
_SR_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
        "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
        "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
        COMPREHENSIVE_3D_SR,
    }
)
_LABELS = {"fake": CODE_AI_GENERATION_SUSPECTED, "real": CODE_NO_AI_GENERATION_DETECTED}
_TEXT_VRS = frozenset({"AE", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"})
# Type 2 attributes that highdicom reads from the first source without a default.
_REQUIRED_TYPE2 = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class ReportError(ValueError):
    """The items cannot be turned into one report (several studies, missing UIDs, bad scores)."""


@dataclass(frozen=True)
class ReportItem:
    dataset: Dataset  # the source header; pixel data is not needed and not read
    score: float  # probability of "AI-generated", in [0, 1]
    label: str  # "fake" or "real", as decided by the detector against `threshold`
    threshold: float


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str  # e.g. "DSKI"
    version: str  # bundle version
    model_version: str  # "<bundle_name>@<bundle_version>+<weights sha256[:12]>"


# --------------------------------------------------------------------------- build


def build_report(
    items: Sequence[ReportItem],
    *,
    algorithm: AlgorithmInfo,
    cfg: ReportConfig,
    scope: Literal["series", "study"],
    instance_number: int = 1,
    now: datetime | None = None,
) -> Dataset:
    """The SR for ``items`` (all from one study; from one series when ``scope="series"``).

    The result is deterministic except for Content/Instance Creation Date and Time:
    the items are sorted, and every UID is derived from the sources and the model version.
    Raises :class:`ReportError` (a ``ValueError``) naming the problem with the input.
    """
    if scope not in ("series", "study"):
        raise ReportError(f"scope must be 'series' or 'study', got {scope!r}")
    if not items:
        raise ReportError("a report needs at least one analysed image")
    for item in items:
        _check_item(item)
    headers = [_header(item.dataset) for item in items]
    study_uids = sorted({h.StudyInstanceUID for h in headers})
    if len(study_uids) > 1:
        raise ReportError(f"items come from {len(study_uids)} studies: {', '.join(study_uids)}")
    series_uids = sorted({h.SeriesInstanceUID for h in headers})
    if scope == "series" and len(series_uids) > 1:
        raise ReportError(f"a series-scope report got items from {len(series_uids)} series: {', '.join(series_uids)}")
    sop_uids = [h.SOPInstanceUID for h in headers]
    duplicates = sorted(u for u, n in Counter(sop_uids).items() if n > 1)
    if duplicates:
        raise ReportError(f"duplicate SOP Instance UIDs in the items: {', '.join(duplicates)}")

    order = sorted(range(len(items)), key=lambda i: _sort_key(headers[i]))
    items = [items[i] for i in order]
    headers = [headers[i] for i in order]

    study_uid = study_uids[0]
    source_series = series_uids[0] if scope == "series" else None
    sop_instance_uid = uids.report_uid(source_series, study_uid, sop_uids, algorithm.model_version)
    series_instance_uid = uids.report_series_uid(study_uid, source_series, algorithm.model_version)

    now = now or datetime.now()
    private_scheme = CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME, name=PRIVATE_SCHEME_NAME, responsible_organization=_lo(cfg.manufacturer)
    )
    try:
        content = _measurement_report(items, headers, algorithm=algorithm, cfg=cfg, report_uid=sop_instance_uid)
        sr = hd.sr.Comprehensive3DSR(
            evidence=headers,
            content=content,
            series_instance_uid=series_instance_uid,
            series_number=cfg.series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer=cfg.manufacturer,
            institution_name=cfg.institution_name,
            is_complete=True,
            is_final=False,  # a machine verdict, not verified by a radiologist
            series_description=cfg.series_description,
            manufacturer_model_name=_lo(algorithm.name),
            software_versions=_lo(f"{algorithm.name} {algorithm.version}"),
            content_date=now.date(),
            content_time=now.time(),
            series_date=now.date(),
            series_time=now.time(),
            coding_schemes=[private_scheme],
            # Replaced below once the copied text is known; set here so that an odd
            # value in the source cannot make highdicom's check fail.
            specific_character_set="ISO_IR 192",
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise ReportError(f"cannot build the SR for study {study_uid}: {exc}") from exc

    _separate_containers(sr)
    _drop_zero_measure(sr, "PatientWeight")
    _drop_zero_measure(sr, "PatientSize")
    sr.SpecificCharacterSet = "ISO_IR 100" if _latin1_only(sr) else "ISO_IR 192"
    logger.info(
        "built report",
        extra={"sop_instance_uid": sop_instance_uid, "study_instance_uid": study_uid, "images": len(items)},
    )
    return sr


# Name from the architecture page.
build_sr = build_report


def _check_item(item: ReportItem) -> None:
    ds = item.dataset
    missing = [kw for kw in _REQUIRED_UIDS if not ds.get(kw)]
    if missing:
        raise ReportError(f"source {ds.get('SOPInstanceUID', '<no SOP Instance UID>')} lacks {', '.join(missing)}")
    for name, value in (("score", item.score), ("threshold", item.threshold)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ReportError(f"{name} {value!r} of {ds.SOPInstanceUID} is not a probability in [0, 1]")
    if item.label not in _LABELS:
        raise ReportError(f"label {item.label!r} of {ds.SOPInstanceUID} is not one of {sorted(_LABELS)}")


def _header(ds: Dataset) -> Dataset:
    """A copy of the source without bulk data, with empty Type 2 attributes where missing.

    highdicom reads the Type 2 patient and study attributes from the first source
    without defaults; a sloppy modality that omits one must not stop the report.
    """
    header = Dataset()
    for elem in ds:
        if elem.tag.group in (0x7FE0, 0x5400) or (0x6000 <= elem.tag.group <= 0x60FF and elem.tag.element == 0x3000):
            continue
        header.add(elem)
    for keyword in _REQUIRED_TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _sort_key(ds: Dataset) -> tuple[str, int, str]:
    try:
        number = int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        number = 2**31
    return (str(ds.SeriesInstanceUID), number, str(ds.SOPInstanceUID))


def _lo(text: str) -> str:
    return text[:64]


def _measurement_report(
    items: Sequence[ReportItem],
    headers: Sequence[Dataset],
    *,
    algorithm: AlgorithmInfo,
    cfg: ReportConfig,
    report_uid: str,
) -> hd.sr.MeasurementReport:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=uids.device_uid(cfg.device_name),
        name=cfg.device_name,
        manufacturer_name=cfg.manufacturer,
        model_name=algorithm.name,
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=device,
        )
    )
    groups = [_summary_group(items, algorithm, report_uid)]
    for index, (item, header) in enumerate(zip(items, headers), start=1):
        groups.append(_image_group(index, item, header, algorithm, report_uid))
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    # The library goes before the measurements (TID 1500 row order), as highdicom does.
    root = report[0]
    position = next(
        i for i, child in enumerate(root.ContentSequence) if child.name == codes.DCM.ImagingMeasurements
    )
    root.ContentSequence.insert(position, _image_library(headers))
    return report


def _algorithm_id(algorithm: AlgorithmInfo, threshold: float) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        family=codes.DCM.ArtificialIntelligence,
        parameters=[f"model_version={algorithm.model_version}", f"threshold={threshold:g}"],
    )


def _image_group(
    index: int, item: ReportItem, header: Dataset, algorithm: AlgorithmInfo, report_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    number = header.get("InstanceNumber")
    label = f"DSKI image {number}" if number not in (None, "") else f"DSKI image #{index}"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.tracking_uid(report_uid, header.SOPInstanceUID), identifier=label
        ),
        algorithm_id=_algorithm_id(algorithm, item.threshold),
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=float(item.score),
                unit=codes.UCUM.NoUnits,
            )
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=CODE_AI_GENERATION_ASSESSMENT, value=_LABELS[item.label])
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(header)],
    )


def _summary_group(
    items: Sequence[ReportItem], algorithm: AlgorithmInfo, report_uid: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    suspected = sum(1 for item in items if item.label == "fake")
    highest = max(float(item.score) for item in items)
    thresholds = sorted({item.threshold for item in items})
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=uids.derive_uid("summary", report_uid), identifier=SUMMARY_TRACKING_IDENTIFIER
        ),
        algorithm_id=_algorithm_id(algorithm, thresholds[-1]) if len(thresholds) == 1 else None,
        measurements=[
            hd.sr.Measurement(name=CODE_IMAGES_ANALYSED, value=len(items), unit=UNIT_IMAGES),
            hd.sr.Measurement(name=CODE_IMAGES_SUSPECTED, value=suspected, unit=UNIT_IMAGES),
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=highest,
                unit=codes.UCUM.NoUnits,
                derivation=codes.SCT.Maximum,
            ),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=CODE_AI_GENERATION_ASSESSMENT,
                value=CODE_AI_GENERATION_SUSPECTED if suspected else CODE_NO_AI_GENERATION_DETECTED,
            )
        ],
    )


def _image_library(headers: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library: one group per modality and frame of reference.

    highdicom's ``ImageLibrary`` stops on a CT without Pixel Spacing or a CR without
    Imager Pixel Spacing (its TID 1603/1604 descriptors read them unconditionally);
    such an image still belongs in the report, with the basic descriptors only.
    """
    rel = hd.sr.RelationshipTypeValues
    groups: dict[tuple[str, str | None], list[hd.sr.ImageContentItem]] = {}
    for header in headers:
        image = hd.sr.ImageContentItem(
            name=hd.sr.CodedConcept(value="260753009", meaning="Source", scheme_designator="SCT"),
            referenced_sop_class_uid=header.SOPClassUID,
            referenced_sop_instance_uid=header.SOPInstanceUID,
            relationship_type=rel.CONTAINS,
        )
        image.ContentSequence = hd.sr.ContentSequence(_descriptors(header))
        key = (str(header.get("Modality", "")), header.get("FrameOfReferenceUID") or None)
        groups.setdefault(key, []).append(image)
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=rel.CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence()
    for (_, frame_of_reference), images in groups.items():
        group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=rel.CONTAINS)
        group.ContentSequence = hd.sr.ContentSequence()
        if frame_of_reference:
            group.ContentSequence.append(
                hd.sr.UIDRefContentItem(
                    name=codes.DCM.FrameOfReferenceUID, value=frame_of_reference, relationship_type=rel.HAS_ACQ_CONTEXT
                )
            )
        group.ContentSequence.extend(images)
        library.ContentSequence.append(group)
    return library


def _descriptors(header: Dataset) -> list[hd.sr.ContentItem]:
    try:
        return list(hd.sr.ImageLibraryEntryDescriptors(header))
    except (AttributeError, TypeError, ValueError, IndexError) as exc:
        logger.warning(
            "image library descriptors reduced to the basics",
            extra={"sop_instance_uid": str(header.SOPInstanceUID), "reason": str(exc)},
        )
    rel = hd.sr.RelationshipTypeValues
    modality = str(header.get("Modality") or "OT")
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=codes.DCM.Modality,
            value=hd.sr.CodedConcept(value=modality, scheme_designator="DCM", meaning=modality),
            relationship_type=rel.HAS_ACQ_CONTEXT,
        )
    ]
    pixels = hd.sr.CodedConcept(value="{pixels}", meaning="Pixels", scheme_designator="UCUM")
    for keyword, name in (("Rows", codes.DCM.PixelDataRows), ("Columns", codes.DCM.PixelDataColumns)):
        if header.get(keyword):
            items.append(
                hd.sr.NumContentItem(
                    name=name, value=int(header.get(keyword)), unit=pixels, relationship_type=rel.HAS_ACQ_CONTEXT
                )
            )
    return items


def _separate_containers(sr: Dataset) -> None:
    """Mark every container SEPARATE: dcmtk's dsr2html (and viewers built like it) only
    show the concept names of items in SEPARATE containers; highdicom writes CONTINUOUS."""
    stack: list[Dataset] = [sr]
    while stack:
        item = stack.pop()
        if item.get("ValueType") == "CONTAINER":
            item.ContinuityOfContent = "SEPARATE"
        stack.extend(item.get("ContentSequence") or [])


def _drop_zero_measure(ds: Dataset, keyword: str) -> None:
    """Remove a zero or empty PatientWeight/PatientSize: modalities write 0 for "unknown"."""
    if keyword not in ds:
        return
    value = ds[keyword].value
    try:
        zero = value in (None, "") or float(value) == 0.0
    except (TypeError, ValueError):
        zero = True  # unparseable: copying it would only spread the error
    if zero:
        del ds[keyword]


def _latin1_only(ds: Dataset) -> bool:
    """True when every text value of ``ds`` (nested sequences included) fits ISO_IR 100."""
    for elem in ds.iterall():
        if elem.VR not in _TEXT_VRS or elem.value is None:
            continue
        values = elem.value if isinstance(elem.value, (list, tuple, pydicom.multival.MultiValue)) else [elem.value]
        for value in values:
            if isinstance(value, bytes):
                continue
            try:
                str(value).encode("latin_1")
            except UnicodeEncodeError:
                return False
    return True


# --------------------------------------------------------------------------- recognise


def is_own_report(ds: Dataset, cfg: ReportConfig | None = None) -> bool:
    """Whether ``ds`` is an SR written by a DSKI node (e.g. forwarded back by the PACS).

    Works on a header read with ``stop_before_pixels``. The private coding scheme is
    the mark every node's report carries; with ``cfg``, an SR with this node's
    Manufacturer and Series Description also counts, in case a PACS drops the
    Coding Scheme Identification Sequence.
    """
    if ds.get("SOPClassUID") not in _SR_SOP_CLASSES and ds.get("Modality") != "SR":
        return False
    for scheme in ds.get("CodingSchemeIdentificationSequence") or []:
        if scheme.get("CodingSchemeDesignator") == PRIVATE_SCHEME:
            return True
    if cfg is not None:
        return ds.get("Manufacturer") == cfg.manufacturer and ds.get("SeriesDescription") == cfg.series_description
    return False


# --------------------------------------------------------------------------- write

_UNSAFE = re.compile(r"[^0-9A-Za-z.\-]")


def report_file_name(sop_instance_uid: str) -> str:
    """``<uid>.dcm`` with anything but digits, letters, dots and dashes replaced."""
    safe = _UNSAFE.sub("_", str(sop_instance_uid).strip())[:128].strip(".")
    if not safe:
        raise ReportError(f"SOP Instance UID {sop_instance_uid!r} gives no usable file name")
    return f"{safe}.dcm"


def write_report(ds: Dataset, reports_dir: Path | str) -> Path:
    """Write ``ds`` as a DICOM file named after its SOP Instance UID, atomically.

    A temporary file in the same folder is written, fsynced and renamed over the
    final name, so a crash leaves either the complete old file or the complete new
    one. Writing the same report again replaces the file.
    """
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    target = reports_dir / report_file_name(ds.SOPInstanceUID)
    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = ds.file_meta if hasattr(ds, "file_meta") else pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=reports_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(reports_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    logger.info("wrote report", extra={"sop_instance_uid": str(ds.SOPInstanceUID), "path": str(target)})
    return target
