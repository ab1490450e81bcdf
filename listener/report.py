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

import copy
import logging
import math
import os
import re
import struct
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import highdicom as hd
import pydicom
from highdicom._standard_utils import does_iod_have_pixel_data
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr.templates import _get_coded_modality
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_dataset, write_file_meta_info
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import DS, EXPLICIT_VR_LENGTH_32

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
_REQUIRED_UIDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)


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

    The content tree is built directly as pydicom data sets (see :class:`_FastTree`),
    element for element what :func:`build_report_highdicom` builds with highdicom's
    templates (``tests/listener/test_report_fast.py`` compares the two), in a few
    milliseconds per image instead of tens. Content items that are the same in many
    places (concept names, units, the algorithm identification, equal descriptors) are
    one shared object: treat the returned data set as read-only, or ``deepcopy`` it
    before changing anything inside its Content Sequence.
    """
    prep = _prepare(items, algorithm=algorithm, scope=scope)
    now = now or datetime.now()
    study_uid = prep.study_uid
    sources = prep.sources
    try:
        tree = _FastTree()
        # highdicom builds the document (header modules, evidence, the TID 1500 root and
        # its context items) around a content tree of the summary group only: cheap,
        # since its constructor deep-copies and searches only that small tree.
        small = _measurement_report(
            prep.items,
            [],
            algorithm=algorithm,
            cfg=cfg,
            report_uid=prep.sop_instance_uid,
            with_library=False,
        )
        evidence = [_header(sources[0]), *sources[1:]]
        sr = _document(
            small,
            evidence,
            prep,
            algorithm=algorithm,
            cfg=cfg,
            instance_number=instance_number,
            now=now,
        )
        _separate_containers(sr)
        groups = [
            tree.image_group(index, item, source, algorithm, prep.sop_instance_uid)
            for index, (item, source) in enumerate(zip(prep.items, sources), start=1)
        ]
        library = tree.image_library(sources)
        sr.ContentSequence = tree.splice_root(sr.ContentSequence, library, groups)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ReportError(f"cannot build the SR for study {study_uid}: {exc}") from exc
    _drop_zero_measure(sr, "PatientWeight")
    _drop_zero_measure(sr, "PatientSize")
    sr.SpecificCharacterSet = "ISO_IR 100" if _latin1_only(sr) else "ISO_IR 192"
    logger.info(
        "built report",
        extra={
            "sop_instance_uid": prep.sop_instance_uid,
            "study_instance_uid": study_uid,
            "images": len(sources),
        },
    )
    return sr


def build_report_highdicom(
    items: Sequence[ReportItem],
    *,
    algorithm: AlgorithmInfo,
    cfg: ReportConfig,
    scope: Literal["series", "study"],
    instance_number: int = 1,
    now: datetime | None = None,
) -> Dataset:
    """The same SR as :func:`build_report`, built entirely with highdicom's templates.

    The reference the fast builder is tested against; about 40 ms per image (its
    ``Comprehensive3DSR`` deep-copies and searches the whole content tree), too slow
    for the node (200 images: 9 s of CPU).
    """
    prep = _prepare(items, algorithm=algorithm, scope=scope)
    now = now or datetime.now()
    headers = [_header(source) for source in prep.sources]
    try:
        content = _measurement_report(
            prep.items,
            headers,
            algorithm=algorithm,
            cfg=cfg,
            report_uid=prep.sop_instance_uid,
        )
        sr = _document(
            content,
            headers,
            prep,
            algorithm=algorithm,
            cfg=cfg,
            instance_number=instance_number,
            now=now,
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise ReportError(f"cannot build the SR for study {prep.study_uid}: {exc}") from exc

    _separate_containers(sr)
    _drop_zero_measure(sr, "PatientWeight")
    _drop_zero_measure(sr, "PatientSize")
    sr.SpecificCharacterSet = "ISO_IR 100" if _latin1_only(sr) else "ISO_IR 192"
    return sr


@dataclass(frozen=True)
class _Prepared:
    items: list[ReportItem]  # sorted
    sources: list[Dataset]  # the items' data sets, same order
    study_uid: str
    source_series: str | None
    sop_instance_uid: str
    series_instance_uid: str


def _prepare(items: Sequence[ReportItem], *, algorithm: AlgorithmInfo, scope: str) -> _Prepared:
    """Check the items, sort them, derive the report's UIDs."""
    if scope not in ("series", "study"):
        raise ReportError(f"scope must be 'series' or 'study', got {scope!r}")
    if not items:
        raise ReportError("a report needs at least one analysed image")
    for item in items:
        _check_item(item)
    sources = [item.dataset for item in items]
    study_uids = sorted({str(h.StudyInstanceUID) for h in sources})
    if len(study_uids) > 1:
        raise ReportError(f"items come from {len(study_uids)} studies: {', '.join(study_uids)}")
    series_uids = sorted({str(h.SeriesInstanceUID) for h in sources})
    if scope == "series" and len(series_uids) > 1:
        raise ReportError(f"a series-scope report got items from {len(series_uids)} series: {', '.join(series_uids)}")
    sop_uids = [h.SOPInstanceUID for h in sources]
    duplicates = sorted(u for u, n in Counter(sop_uids).items() if n > 1)
    if duplicates:
        raise ReportError(f"duplicate SOP Instance UIDs in the items: {', '.join(duplicates)}")

    order = sorted(range(len(items)), key=lambda i: _sort_key(sources[i]))
    study_uid = study_uids[0]
    source_series = series_uids[0] if scope == "series" else None
    return _Prepared(
        items=[items[i] for i in order],
        sources=[sources[i] for i in order],
        study_uid=study_uid,
        source_series=source_series,
        sop_instance_uid=uids.report_uid(source_series, study_uid, sop_uids, algorithm.model_version),
        series_instance_uid=uids.report_series_uid(study_uid, source_series, algorithm.model_version),
    )


def _document(
    content: Dataset,
    evidence: Sequence[Dataset],
    prep: _Prepared,
    *,
    algorithm: AlgorithmInfo,
    cfg: ReportConfig,
    instance_number: int,
    now: datetime,
) -> Dataset:
    private_scheme = CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name=PRIVATE_SCHEME_NAME,
        responsible_organization=_lo(cfg.manufacturer),
    )
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content,
        series_instance_uid=prep.series_instance_uid,
        series_number=cfg.series_number,
        sop_instance_uid=prep.sop_instance_uid,
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
        # Replaced by the caller once the copied text is known; set here so that an odd
        # value in the source cannot make highdicom's check fail.
        specific_character_set="ISO_IR 192",
    )


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


# Everything build_report reads from a source other than the first in report order (the
# one it copies the patient and study from, which it reads whole): a caller holding many
# headers as bytes may parse just these (``dcmread(..., specific_tags=SOURCE_TAGS)``).
SOURCE_TAGS = (
    "SpecificCharacterSet",
    *_REQUIRED_UIDS,
    "InstanceNumber",
    "Modality",
    "FrameOfReferenceUID",
    "Rows",
    "Columns",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
    "SpacingBetweenSlices",
    "PatientOrientation",
    "ImagerPixelSpacing",
)


def report_order_key(ds: Dataset) -> tuple[str, int, str]:
    """The order of the images in the report; the smallest is the source it copies the
    patient and study from."""
    return _sort_key(ds)


def warm_up() -> None:
    """Build one small report, so that the first real one does not pay for loading
    highdicom's tables of the standard (0.2 to 0.5 s)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.StudyInstanceUID = uids.derive_uid("warm-up", "study")
    ds.SeriesInstanceUID = uids.derive_uid("warm-up", "series")
    ds.SOPInstanceUID = uids.derive_uid("warm-up", "instance")
    ds.Modality = "CT"
    ds.Rows = 1
    ds.Columns = 1
    item = ReportItem(dataset=ds, score=0.0, label="real", threshold=0.5)
    algorithm = AlgorithmInfo(name="DSKI", version="0", model_version="warm-up")
    encode_report(build_report([item], algorithm=algorithm, cfg=ReportConfig(), scope="series"))


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
    with_library: bool = True,
) -> hd.sr.MeasurementReport:
    """TID 1500; without the library and the image groups when ``with_library`` is false
    (the fast builder adds both)."""
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
    if not with_library:
        return hd.sr.MeasurementReport(
            observation_context=observation_context,
            procedure_reported=PROCEDURE_REPORTED,
            imaging_measurements=groups,
        )
    for index, (item, header) in enumerate(zip(items, headers), start=1):
        groups.append(_image_group(index, item, header, algorithm, report_uid))
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
    )
    # The library goes before the measurements (TID 1500 row order), as highdicom does.
    root = report[0]
    position = next(i for i, child in enumerate(root.ContentSequence) if child.name == codes.DCM.ImagingMeasurements)
    root.ContentSequence.insert(position, _image_library(headers))
    return report


def _algorithm_id(algorithm: AlgorithmInfo, threshold: float) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        family=codes.DCM.ArtificialIntelligence,
        parameters=[
            f"model_version={algorithm.model_version}",
            f"threshold={threshold:g}",
        ],
    )


def _image_group(
    index: int,
    item: ReportItem,
    header: Dataset,
    algorithm: AlgorithmInfo,
    report_uid: str,
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
            uid=uids.derive_uid("summary", report_uid),
            identifier=SUMMARY_TRACKING_IDENTIFIER,
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
        key = (
            str(header.get("Modality", "")),
            header.get("FrameOfReferenceUID") or None,
        )
        groups.setdefault(key, []).append(image)
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=rel.CONTAINS)
    library.ContentSequence = hd.sr.ContentSequence()
    for (_, frame_of_reference), images in groups.items():
        group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=rel.CONTAINS)
        group.ContentSequence = hd.sr.ContentSequence()
        if frame_of_reference:
            group.ContentSequence.append(
                hd.sr.UIDRefContentItem(
                    name=codes.DCM.FrameOfReferenceUID,
                    value=frame_of_reference,
                    relationship_type=rel.HAS_ACQ_CONTEXT,
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
    for keyword, name in (
        ("Rows", codes.DCM.PixelDataRows),
        ("Columns", codes.DCM.PixelDataColumns),
    ):
        if header.get(keyword):
            items.append(
                hd.sr.NumContentItem(
                    name=name,
                    value=int(header.get(keyword)),
                    unit=pixels,
                    relationship_type=rel.HAS_ACQ_CONTEXT,
                )
            )
    return items


# --------------------------------------------------------------------------- fast content tree

_TAG_REFERENCED_SOP_SEQUENCE = BaseTag(0x00081199)
_TAG_REFERENCED_SOP_CLASS_UID = BaseTag(0x00081150)
_TAG_REFERENCED_SOP_INSTANCE_UID = BaseTag(0x00081155)
_TAG_MEASUREMENT_UNITS = BaseTag(0x004008EA)
_TAG_RELATIONSHIP_TYPE = BaseTag(0x0040A010)
_TAG_VALUE_TYPE = BaseTag(0x0040A040)
_TAG_CONCEPT_NAME = BaseTag(0x0040A043)
_TAG_CONTINUITY = BaseTag(0x0040A050)
_TAG_UID = BaseTag(0x0040A124)
_TAG_TEXT_VALUE = BaseTag(0x0040A160)
_TAG_FLOATING_POINT_VALUE = BaseTag(0x0040A161)
_TAG_CONCEPT_CODE = BaseTag(0x0040A168)
_TAG_MEASURED_VALUE = BaseTag(0x0040A300)
_TAG_NUMERIC_VALUE = BaseTag(0x0040A30A)
_TAG_CONTENT_TEMPLATE = BaseTag(0x0040A504)
_TAG_CONTENT_SEQUENCE = BaseTag(0x0040A730)

_CODE_SOURCE = Code("260753009", "SCT", "Source")
_UNIT_PIXELS = Code("{pixels}", "UCUM", "Pixels")
_UNIT_ORIENTATION = Code("{-1:1}", "UCUM", "{-1:1}")
_CROSS_SECTIONAL = frozenset({"CT", "MR", "PT"})
_PROJECTION = frozenset({"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"})


def _el(tag: BaseTag, vr: str, value: Any) -> DataElement:
    """An element whose value already has the type pydicom would give it (no conversion)."""
    return DataElement(tag, vr, value, already_converted=True)


def _seq(tag: BaseTag, datasets: list[Dataset]) -> DataElement:
    return DataElement(tag, "SQ", PydicomSequence(datasets), already_converted=True)


class _FastTree:
    """Builds the per-image part of the content tree as plain pydicom data sets.

    Each method mirrors one highdicom template or content item class used by
    :func:`build_report_highdicom` and gives the same elements with the same values:
    the concept names and units are highdicom ``CodedConcept`` objects, numbers go
    through the same ``DS(value, auto_format=True)``. What does not vary (a concept
    name's sequence, the algorithm identification, a descriptor with the same value)
    is built once per report and shared. Anything unusual in a source (a missing or
    odd attribute, a modality highdicom does not know) takes highdicom's own path for
    that image (:func:`_descriptors`), so odd inputs give exactly what they gave before.
    """

    def __init__(self) -> None:
        self._codes: dict[tuple, hd.sr.CodedConcept] = {}
        self._names: dict[tuple, DataElement] = {}
        self._values: dict[tuple, DataElement] = {}
        self._items: dict[tuple, Dataset] = {}
        self._relationship: dict[str, DataElement] = {}
        self._value_type: dict[str, DataElement] = {}
        self._modality: dict[str, Dataset | None] = {}

    # -- shared pieces ---------------------------------------------------------------

    @staticmethod
    def _code_key(code: Code | hd.sr.CodedConcept) -> tuple:
        return (code.value, code.scheme_designator, code.meaning, code.scheme_version)

    def _code(self, code: Code | hd.sr.CodedConcept) -> hd.sr.CodedConcept:
        key = self._code_key(code)
        concept = self._codes.get(key)
        if concept is None:
            concept = code if isinstance(code, hd.sr.CodedConcept) else hd.sr.CodedConcept.from_code(code)
            self._codes[key] = concept
        return concept

    def _name(self, code: Code | hd.sr.CodedConcept) -> DataElement:
        key = self._code_key(code)
        elem = self._names.get(key)
        if elem is None:
            elem = self._names[key] = _seq(_TAG_CONCEPT_NAME, [self._code(code)])
        return elem

    def _code_value(self, code: Code | hd.sr.CodedConcept) -> DataElement:
        key = self._code_key(code)
        elem = self._values.get(key)
        if elem is None:
            elem = self._values[key] = _seq(_TAG_CONCEPT_CODE, [self._code(code)])
        return elem

    def _rel(self, relationship: str) -> DataElement:
        elem = self._relationship.get(relationship)
        if elem is None:
            elem = self._relationship[relationship] = _el(_TAG_RELATIONSHIP_TYPE, "CS", relationship)
        return elem

    def _vt(self, value_type: str) -> DataElement:
        elem = self._value_type.get(value_type)
        if elem is None:
            elem = self._value_type[value_type] = _el(_TAG_VALUE_TYPE, "CS", value_type)
        return elem

    def _item(
        self,
        value_type: str,
        name: Code | hd.sr.CodedConcept,
        relationship: str,
        *extra: DataElement,
    ) -> Dataset:
        elements = {
            _TAG_RELATIONSHIP_TYPE: self._rel(relationship),
            _TAG_VALUE_TYPE: self._vt(value_type),
            _TAG_CONCEPT_NAME: self._name(name),
        }
        for elem in extra:
            elements[elem.tag] = elem
        return Dataset(elements)

    def _shared(self, key: tuple, build: Any) -> Dataset:
        item = self._items.get(key)
        if item is None:
            item = self._items[key] = build()
        return item

    # -- content items (highdicom.sr.value_types) ---------------------------------------

    def text(self, name: Code, value: str, relationship: str) -> Dataset:
        return self._item("TEXT", name, relationship, _el(_TAG_TEXT_VALUE, "UT", value))

    def uidref(self, name: Code, value: str, relationship: str) -> Dataset:
        return self._item("UIDREF", name, relationship, _el(_TAG_UID, "UI", UID(value)))

    def code(self, name: Code, value: Code | hd.sr.CodedConcept, relationship: str) -> Dataset:
        return self._item("CODE", name, relationship, self._code_value(value))

    def num(self, name: Code, value: float, unit: Code, relationship: str) -> Dataset:
        measured = {
            _TAG_MEASUREMENT_UNITS: self._unit(unit),
            _TAG_NUMERIC_VALUE: _el(_TAG_NUMERIC_VALUE, "DS", DS(value, auto_format=True)),
        }
        if isinstance(value, float):
            measured[_TAG_FLOATING_POINT_VALUE] = _el(_TAG_FLOATING_POINT_VALUE, "FD", value)
        return self._item("NUM", name, relationship, _seq(_TAG_MEASURED_VALUE, [Dataset(measured)]))

    def _unit(self, unit: Code) -> DataElement:
        key = ("unit", *self._code_key(unit))
        elem = self._values.get(key)
        if elem is None:
            elem = self._values[key] = _seq(_TAG_MEASUREMENT_UNITS, [self._code(unit)])
        return elem

    def image(self, name: Code | hd.sr.CodedConcept, source: Dataset, relationship: str) -> Dataset:
        reference = Dataset(
            {
                _TAG_REFERENCED_SOP_CLASS_UID: _el(_TAG_REFERENCED_SOP_CLASS_UID, "UI", UID(source.SOPClassUID)),
                _TAG_REFERENCED_SOP_INSTANCE_UID: _el(
                    _TAG_REFERENCED_SOP_INSTANCE_UID, "UI", UID(source.SOPInstanceUID)
                ),
            }
        )
        return self._item("IMAGE", name, relationship, _seq(_TAG_REFERENCED_SOP_SEQUENCE, [reference]))

    def container(
        self,
        name: Code,
        relationship: str,
        children: list[Dataset],
        template: str | None = None,
    ) -> Dataset:
        extra = [
            _el(_TAG_CONTINUITY, "CS", "SEPARATE"),
            _seq(_TAG_CONTENT_SEQUENCE, children),
        ]
        if template is not None:
            extra.append(self._template(template))
        return self._item("CONTAINER", name, relationship, *extra)

    def _template(self, template: str) -> DataElement:
        key = ("template", template)
        elem = self._values.get(key)
        if elem is None:
            tid = Dataset(
                {
                    BaseTag(0x00080105): _el(BaseTag(0x00080105), "CS", "DCMR"),
                    BaseTag(0x0040DB00): _el(BaseTag(0x0040DB00), "CS", template),
                }
            )
            elem = self._values[key] = _seq(_TAG_CONTENT_TEMPLATE, [tid])
        return elem

    # -- TID 1501 per image (mirrors _image_group) ---------------------------------------

    def image_group(
        self,
        index: int,
        item: ReportItem,
        source: Dataset,
        algorithm: AlgorithmInfo,
        report_uid: str,
    ) -> Dataset:
        number = source.get("InstanceNumber")
        label = f"DSKI image {number}" if number not in (None, "") else f"DSKI image #{index}"
        children = [
            self.text(codes.DCM.TrackingIdentifier, label, "HAS OBS CONTEXT"),
            self.uidref(
                codes.DCM.TrackingUniqueIdentifier,
                uids.tracking_uid(report_uid, source.SOPInstanceUID),
                "HAS OBS CONTEXT",
            ),
            *self._algorithm(algorithm, item.threshold),
            self.num(codes.DCM.Probability, float(item.score), codes.UCUM.NoUnits, "CONTAINS"),
            self._shared(
                ("verdict", item.label),
                lambda: self.code(CODE_AI_GENERATION_ASSESSMENT, _LABELS[item.label], "CONTAINS"),
            ),
            self.image(codes.DCM.SourceOfMeasurement, source, "CONTAINS"),
        ]
        return self.container(codes.DCM.MeasurementGroup, "CONTAINS", children, template="1501")

    def _algorithm(self, algorithm: AlgorithmInfo, threshold: float) -> list[Dataset]:
        """TID 4019, as highdicom's ``AlgorithmIdentification`` (one shared list per threshold)."""
        parameters = [
            f"model_version={algorithm.model_version}",
            f"threshold={threshold:g}",
        ]
        rel = "HAS CONCEPT MOD"
        return [
            self._shared(
                ("algorithm", "name", algorithm.name),
                lambda: self.text(codes.DCM.AlgorithmName, algorithm.name, rel),
            ),
            self._shared(
                ("algorithm", "version", algorithm.version),
                lambda: self.text(codes.DCM.AlgorithmVersion, algorithm.version, rel),
            ),
            *(
                self._shared(
                    ("algorithm", "parameter", p),
                    lambda p=p: self.text(codes.DCM.AlgorithmParameters, p, rel),
                )
                for p in parameters
            ),
            self._shared(
                ("algorithm", "family"),
                lambda: self.code(codes.DCM.AlgorithmFamily, codes.DCM.ArtificialIntelligence, rel),
            ),
        ]

    # -- TID 1600 (mirrors _image_library) ---------------------------------------------

    def image_library(self, sources: Sequence[Dataset]) -> Dataset:
        acq = "HAS ACQ CONTEXT"
        groups: dict[tuple[str, str | None], list[Dataset]] = {}
        for source in sources:
            image = self.image(_CODE_SOURCE, source, "CONTAINS")
            image[_TAG_CONTENT_SEQUENCE] = _seq(_TAG_CONTENT_SEQUENCE, self._descriptors(source))
            key = (
                str(source.get("Modality", "")),
                source.get("FrameOfReferenceUID") or None,
            )
            groups.setdefault(key, []).append(image)
        children = []
        for (_, frame_of_reference), images in groups.items():
            members: list[Dataset] = []
            if frame_of_reference:
                members.append(self.uidref(codes.DCM.FrameOfReferenceUID, frame_of_reference, acq))
            members.extend(images)
            children.append(self.container(codes.DCM.ImageLibraryGroup, "CONTAINS", members))
        return self.container(codes.DCM.ImageLibrary, "CONTAINS", children)

    def _descriptors(self, source: Dataset) -> list[Dataset]:
        """TID 1602-1604 as highdicom's ``ImageLibraryEntryDescriptors``, for well-formed
        sources; anything else goes through highdicom (:func:`_descriptors`)."""
        items = self._fast_descriptors(source)
        if items is None:
            return list(_descriptors(source))
        return items

    def _modality_item(self, sop_class_uid: str) -> Dataset | None:
        if sop_class_uid not in self._modality:
            try:
                if not does_iod_have_pixel_data(sop_class_uid):
                    raise ValueError(sop_class_uid)
                concept = _get_coded_modality(sop_class_uid)
            except (AttributeError, TypeError, ValueError, KeyError, IndexError):
                self._modality[sop_class_uid] = None
            else:
                self._modality[sop_class_uid] = self.code(codes.DCM.Modality, concept, "HAS ACQ CONTEXT")
        return self._modality[sop_class_uid]

    def _fast_descriptors(self, source: Dataset) -> list[Dataset] | None:
        acq = "HAS ACQ CONTEXT"
        modality_item = self._modality_item(str(source.get("SOPClassUID", "")))
        if modality_item is None:
            return None
        items = [modality_item]
        if "FrameOfReferenceUID" in source:
            frame_of_reference = source.FrameOfReferenceUID
            if not isinstance(frame_of_reference, str) or not frame_of_reference:
                return None
            items.append(
                self._shared(
                    ("uidref", "for", frame_of_reference),
                    lambda: self.uidref(codes.DCM.FrameOfReferenceUID, frame_of_reference, acq),
                )
            )
        rows, columns = source.get("Rows"), source.get("Columns")
        if not _number(rows) or not _number(columns):
            return None
        numbers: list[tuple[Code, Any, Code]] = [
            (codes.DCM.PixelDataRows, rows, _UNIT_PIXELS),
            (codes.DCM.PixelDataColumns, columns, _UNIT_PIXELS),
        ]
        modality = source.get("Modality")
        mm = codes.UCUM.Millimeter
        if modality in _CROSS_SECTIONAL:
            spacing = _numbers(source.get("PixelSpacing"), 2)
            orientation = _numbers(source.get("ImageOrientationPatient"), 6)
            position = _numbers(source.get("ImagePositionPatient"), 3)
            thickness = source.get("SliceThickness")
            if spacing is None or orientation is None or position is None or not _number(thickness):
                return None
            numbers += [
                (codes.DCM.HorizontalPixelSpacing, spacing[1], mm),
                (codes.DCM.VerticalPixelSpacing, spacing[0], mm),
                (codes.DCM.SliceThickness, thickness, mm),
                (codes.DCM.ImagePositionPatientX, position[0], mm),
                (codes.DCM.ImagePositionPatientY, position[1], mm),
                (codes.DCM.ImagePositionPatientZ, position[2], mm),
                (
                    codes.DCM.ImageOrientationPatientRowX,
                    orientation[0],
                    _UNIT_ORIENTATION,
                ),
                (
                    codes.DCM.ImageOrientationPatientRowY,
                    orientation[1],
                    _UNIT_ORIENTATION,
                ),
                (
                    codes.DCM.ImageOrientationPatientRowZ,
                    orientation[2],
                    _UNIT_ORIENTATION,
                ),
                (
                    codes.DCM.ImageOrientationPatientColumnX,
                    orientation[3],
                    _UNIT_ORIENTATION,
                ),
                (
                    codes.DCM.ImageOrientationPatientColumnY,
                    orientation[4],
                    _UNIT_ORIENTATION,
                ),
                (
                    codes.DCM.ImageOrientationPatientColumnZ,
                    orientation[5],
                    _UNIT_ORIENTATION,
                ),
            ]
            if hasattr(source, "SpacingBetweenSlices"):
                between = source.SpacingBetweenSlices
                if not _number(between):
                    return None
                numbers.append((codes.DCM.SpacingBetweenSlices, between, mm))
        elif modality in _PROJECTION:
            return None  # rare here: highdicom's path (TID 1603, texts from Patient Orientation)
        for name, value, unit in numbers:
            key = (
                "num",
                name.value,
                name.scheme_designator,
                unit.value,
                type(value),
                value,
                str(value),
            )
            items.append(self._shared(key, lambda n=name, v=value, u=unit: self.num(n, v, u, acq)))
        return items

    # -- the root ------------------------------------------------------------------------

    def splice_root(self, root_children: Sequence[Dataset], library: Dataset, groups: list[Dataset]) -> PydicomSequence:
        """The root's children as highdicom made them (summary group only), with the
        image library before Imaging Measurements and the image groups after the summary."""
        children = list(root_children)
        position = next(i for i, child in enumerate(children) if _is_concept(child, codes.DCM.ImagingMeasurements))
        measurements = children[position]
        replacement = Dataset({elem.tag: elem for elem in measurements if elem.tag != _TAG_CONTENT_SEQUENCE})
        replacement[_TAG_CONTENT_SEQUENCE] = _seq(_TAG_CONTENT_SEQUENCE, [*measurements.ContentSequence, *groups])
        children[position] = replacement
        children.insert(position, library)
        return PydicomSequence(children)


def _is_concept(item: Dataset, code: Code) -> bool:
    names = item.get("ConceptNameCodeSequence") or []
    return (
        bool(names)
        and names[0].get("CodeValue") == code.value
        and names[0].get("CodingSchemeDesignator") == code.scheme_designator
    )


def _number(value: Any) -> bool:
    """What highdicom's NumContentItem accepts as a value."""
    return isinstance(value, (int, float))


def _numbers(value: Any, count: int) -> list[Any] | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        values = list(value)
    except TypeError:
        return None
    if len(values) < count or not all(_number(v) for v in values[:count]):
        return None
    return values


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
    """True when every text value of ``ds`` (nested sequences included) fits ISO_IR 100.

    Each data set is looked at once, however often the content tree shares it.
    """
    seen: set[int] = set()
    stack: list[Dataset] = [ds]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for tag in list(current.keys()):
            elem = current[tag]
            if elem.VR == "SQ":
                stack.extend(elem.value or [])
                continue
            if elem.VR not in _TEXT_VRS:
                continue
            value = elem.value
            if value is None:
                continue
            values = value if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
            for text in values:
                if isinstance(text, bytes):
                    continue
                try:
                    str(text).encode("latin_1")
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


_ITEM_TAG = b"\xfe\xff\x00\xe0"
_STRING_VRS = frozenset({"AE", "AS", "CS"})  # pydicom's write_string, padded with a space
_ASCII_TEXT_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})  # write_text: the character set matters
_NUMBER_FORMATS = {
    "FD": "<d",
    "FL": "<f",
    "SL": "<l",
    "SS": "<h",
    "UL": "<L",
    "US": "<H",
    "SV": "<q",
    "UV": "<Q",
}
_WRITABLE_CHARSETS = frozenset({"ISO_IR 100", "ISO_IR 192"})


class _Encoder:
    """Explicit VR Little Endian bytes of data sets, as pydicom's ``write_dataset`` gives them.

    pydicom spends about 35 µs per element (a buffer per element, the ambiguous-VR pass
    over every nested data set, seeks to patch item lengths): 2 to 6 s for the 64,000
    elements of a 200-image report. This encoder handles the few value types the content
    tree holds (ASCII strings, UIDs, DS/IS, single binary numbers, sequences with defined
    lengths) and hands every other element to pydicom's own ``write_data_element``; a data
    set the content tree shares is encoded once. ``tests/listener/test_report_fast.py``
    checks that the file is byte for byte the one pydicom writes.
    """

    def __init__(self, encodings: str | list[str]) -> None:
        self._encodings = encodings
        self._memo: dict[int, tuple[Dataset, bytes]] = {}

    def dataset(self, ds: Dataset, *, top: bool = False) -> bytes:
        """The elements of ``ds``; a nested one (``top`` false) with its own character
        set or an undefined length goes to pydicom whole."""
        hit = self._memo.get(id(ds))
        if hit is not None:
            return hit[1]
        if not top and ("SpecificCharacterSet" in ds or getattr(ds, "is_undefined_length_sequence_item", False)):
            out = self._fallback_dataset(ds)
        else:
            parts = []
            for tag in sorted(ds.keys()):
                if tag.element == 0 and tag.group > 6:
                    continue  # pydicom drops group lengths too
                parts.append(self.element(ds[tag]))
            out = b"".join(parts)
        self._memo[id(ds)] = (ds, out)
        return out

    def element(self, elem: DataElement) -> bytes:
        vr = elem.VR
        value = elem.value
        if vr == "SQ":
            if elem.is_undefined_length:
                return self._fallback(elem)
            body = b"".join(
                _ITEM_TAG + struct.pack("<I", len(encoded)) + encoded
                for encoded in (self.dataset(item) for item in (value or ()))
            )
            return _element_header(elem.tag, vr, len(body)) + body
        if value is None or value == "":
            if vr in _NUMBER_FORMATS or vr in _STRING_VRS or vr in _ASCII_TEXT_VRS or vr in ("UI", "DS", "IS"):
                return _element_header(elem.tag, vr, 0)
            return self._fallback(elem)
        if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
            return self._fallback(elem)
        if vr in _NUMBER_FORMATS:
            if not isinstance(value, (int, float)):
                return self._fallback(elem)
            raw = struct.pack(_NUMBER_FORMATS[vr], value)
        elif vr in ("DS", "IS"):
            text = value.original_string if hasattr(value, "original_string") else str(value)
            if not text.isascii():
                return self._fallback(elem)
            raw = text.encode("ascii")
            if len(raw) % 2:
                raw += b" "
        elif vr == "UI" or vr in _STRING_VRS or vr in _ASCII_TEXT_VRS:
            if not isinstance(value, str) or not value.isascii():
                return self._fallback(elem)
            raw = value.encode("ascii")
            if len(raw) % 2:
                raw += b"\x00" if vr == "UI" else b" "
        else:
            return self._fallback(elem)
        if len(raw) > 0xFFFF and vr not in EXPLICIT_VR_LENGTH_32:
            return self._fallback(elem)
        return _element_header(elem.tag, vr, len(raw)) + raw

    def _buffer(self) -> DicomBytesIO:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        return fp

    def _fallback(self, elem: DataElement) -> bytes:
        fp = self._buffer()
        write_data_element(fp, elem, self._encodings)
        return fp.getvalue()

    def _fallback_dataset(self, ds: Dataset) -> bytes:
        fp = self._buffer()
        write_dataset(fp, ds, parent_encoding=self._encodings)
        return fp.getvalue()


def _element_header(tag: BaseTag, vr: str, length: int) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr in EXPLICIT_VR_LENGTH_32:
        return head + struct.pack("<HI", 0, length)
    return head + struct.pack("<H", length)


def encode_report(ds: Dataset) -> bytes | None:
    """The file ``ds.save_as(..., enforce_file_format=True)`` would write, or None when
    ``ds`` is outside what :class:`_Encoder` does (then pydicom writes it)."""
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is None or file_meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        return None
    charset = ds.get("SpecificCharacterSet")
    if charset not in _WRITABLE_CHARSETS:
        return None
    if any(tag < 0x00030000 for tag in ds.keys()) or "PixelData" in ds:  # noqa: SIM118 (tags, not elements)
        return None
    for tag in ds.keys():  # noqa: SIM118
        vr = ds[tag].VR
        if vr is None or len(vr) != 2:
            return None  # ambiguous VRs: pydicom's correct_ambiguous_vr knows what to do
    preamble = getattr(ds, "preamble", None) or b"\x00" * 128
    if len(preamble) != 128:
        return None
    # what dcmwrite(enforce_file_format=True) does to a copy of the file meta
    file_meta = copy.deepcopy(file_meta)
    if file_meta.get("MediaStorageSOPClassUID") is None or (
        ds.get("SOPClassUID") and ds.SOPClassUID != file_meta.MediaStorageSOPClassUID
    ):
        file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID")
    if file_meta.get("MediaStorageSOPInstanceUID") is None or (
        ds.get("SOPInstanceUID") and ds.SOPInstanceUID != file_meta.MediaStorageSOPInstanceUID
    ):
        file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID")
    validate_file_meta(file_meta, enforce_standard=True)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    fp.write(preamble)
    fp.write(b"DICM")
    write_file_meta_info(fp, file_meta, enforce_standard=True)
    return fp.getvalue() + _Encoder(charset).dataset(ds, top=True)


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
        encoded = encode_report(ds)
        with os.fdopen(fd, "wb") as fh:
            if encoded is None:
                ds.save_as(fh, enforce_file_format=True)
            else:
                fh.write(encoded)
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
    logger.info(
        "wrote report",
        extra={"sop_instance_uid": str(ds.SOPInstanceUID), "path": str(target)},
    )
    return target
