"""Which received objects the detector scores.

The decision is made from the SOP Class UID alone (plus, for the node's own reports,
two header attributes), so the listener can take it before any pixel data is decoded.
Objects that are not acquired images (structured reports, key object selections,
presentation states, RT objects other than RT images, waveforms, encapsulated
documents, raw data, registrations, segmentations, measurements, spectroscopy...)
are stored as ``skipped`` with the reason returned here and never scored: a deepfake
verdict on them would mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydicom.dataset import Dataset
from pydicom.uid import UID

from listener.config import ReportConfig

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."

# Families of non-image storage classes, by the UID below 1.2.840.10008.5.1.4.1.1.
# The longest matching prefix wins, so exceptions (RT Image inside the RT family)
# are listed as images explicitly.
_NON_IMAGE_FAMILIES: dict[str, str] = {
    "88.": "structured report",
    "88.59": "key object selection",
    "11": "presentation state or VOI LUT",
    "9.": "waveform",
    "9": "standalone curve (retired)",
    "104.": "encapsulated document",
    "66": "raw data",
    "66.1": "spatial registration",
    "66.2": "spatial fiducials",
    "66.3": "deformable spatial registration",
    "66.4": "segmentation",
    "66.5": "surface segmentation",
    "66.6": "tractography results",
    "66.7": "label map segmentation",
    "66.8": "height map segmentation",
    "67": "real world value mapping",
    "68.": "surface scan",
    "4.2": "MR spectroscopy",
    "30": "parametric map (derived values, not an acquisition)",
    "481.": "radiotherapy object (structure set, plan, dose, record, instruction)",
    "77.1.5.3": "stereometric relationship",
    "77.1.5.8": "ophthalmic OCT B-scan volume analysis",
    "78.": "ophthalmic measurements",
    "79.": "ophthalmic report",
    "80.": "visual field measurements",
    "81.": "ophthalmic thickness map (derived values)",
    "82.": "corneal topography map (derived values)",
    "90.": "content assessment results",
    "91.": "microscopy annotations",
    "131": "basic structured display",
    "200.": "performed procedure protocol",
    "201.": "inventory",
    "8": "standalone overlay (retired)",
    "10": "standalone modality LUT (retired)",
    "129": "standalone PET curve (retired)",
}
_IMAGE_EXCEPTIONS: frozenset[str] = frozenset(
    {
        "481.1",  # RT Image
        "481.23",  # Enhanced RT Image
        "481.24",  # Enhanced Continuous RT Image
    }
)
# Storage classes outside the 1.2.840.10008.5.1.4.1.1 branch.
_OTHER_NON_IMAGE: dict[str, str] = {
    "1.2.840.10008.5.1.4.34.": "radiotherapy delivery instruction",
    "1.2.840.10008.5.1.1.27": "stored print (retired)",
    "1.2.840.10008.5.1.4.38.": "hanging protocol",
    "1.2.840.10008.5.1.4.39.": "color palette",
    "1.2.840.10008.5.1.4.43.": "generic implant template",
    "1.2.840.10008.5.1.4.44.": "implant assembly template",
    "1.2.840.10008.5.1.4.45.": "implant template group",
}

OWN_REPORT_REASON = "own report"

Kind = Literal["image", "non-image", "own-report"]


@dataclass(frozen=True)
class Classification:
    kind: Kind
    reason: str

    @property
    def analyse(self) -> bool:
        return self.kind == "image"


def _family_reason(sop_class_uid: str) -> str | None:
    """The non-image family of a storage class, or None when it is an image class."""
    for prefix, reason in _OTHER_NON_IMAGE.items():
        if sop_class_uid == prefix.rstrip(".") or sop_class_uid.startswith(prefix):
            return reason
    if not sop_class_uid.startswith(_STORAGE_ROOT):
        return None
    tail = sop_class_uid[len(_STORAGE_ROOT):]
    if tail in _IMAGE_EXCEPTIONS:
        return None
    best: tuple[int, str] | None = None
    for key, reason in _NON_IMAGE_FAMILIES.items():
        # "66" matches "66" only; "88." matches "88.x"; "11" matches "11" and "11.x".
        if key.endswith("."):
            hit = tail.startswith(key)
        else:
            hit = tail == key or tail.startswith(key + ".")
        if hit and (best is None or len(key) > best[0]):
            best = (len(key), reason)
    return best[1] if best else None


def classify_sop_class(sop_class_uid: str | None, *, has_image_attributes: bool | None = None) -> Classification:
    """Image or not, from the SOP Class UID.

    ``has_image_attributes`` (Rows and Columns present) decides for SOP classes that
    neither pydicom nor this table knows (private classes): without it they are skipped.
    """
    uid = (sop_class_uid or "").strip()
    if not uid:
        return Classification("non-image", "no SOP Class UID")
    family = _family_reason(uid)
    name = UID(uid).name
    known = name != uid
    if family is not None:
        label = f"{name}: " if known else ""
        return Classification("non-image", f"non-image SOP class ({label}{family})")
    if known or uid.startswith(_STORAGE_ROOT):
        return Classification("image", f"image SOP class ({name})")
    if has_image_attributes:
        return Classification("image", f"unknown SOP class {uid} with image attributes")
    return Classification("non-image", f"unknown SOP class {uid} without Rows/Columns")


def _is_own_report_by_report_module(ds: Dataset, cfg: ReportConfig) -> bool:
    try:
        from listener.report import is_own_report as report_says_own
    except ImportError:  # the report module is optional for the listener's unit tests
        return False
    try:
        return bool(report_says_own(ds, cfg))
    except Exception:  # a header-only dataset may lack what is_own_report looks at
        return False


def is_own_report(ds: Dataset, cfg: ReportConfig) -> bool:
    """True for an SR this node (or a node of this product) wrote.

    Recognised by the report module's test (our private coding scheme) and, even
    when the PACS drops that, by the SOP class being an SR together with our
    Manufacturer: a PACS forwarding our report back must not get it analysed again.
    The header must include Manufacturer, SeriesDescription and the Coding Scheme
    Identification Sequence (see ``listener.header.HEADER_TAGS``).
    """
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if not sop_class.startswith(SR_PREFIX) and ds.get("Modality") != "SR":
        return False
    if str(ds.get("Manufacturer", "") or "").strip() == cfg.manufacturer.strip():
        return True
    return _is_own_report_by_report_module(ds, cfg)


_OWN_REPORT = Classification("own-report", OWN_REPORT_REASON)


def _sop_class_key(ds: Dataset) -> tuple[str, bool]:
    """What ``classify_sop_class`` decides from: the SOP Class UID, and whether Rows and Columns are present."""
    return str(ds.get("SOPClassUID", "") or ""), "Rows" in ds and "Columns" in ds


def classify(ds: Dataset, cfg: ReportConfig) -> Classification:
    """Classify a (header-only) dataset: own report, non-image or image."""
    if is_own_report(ds, cfg):
        return _OWN_REPORT
    uid, has_image = _sop_class_key(ds)
    return classify_sop_class(uid, has_image_attributes=has_image)


class Classifier:
    """``classify`` for one configuration, remembering the decision per SOP class.

    The C-STORE handler classifies every object, and the same few classes arrive over and
    over; deciding one (the family table, pydicom's UID name) cost about 50 µs of the
    association's thread. The own-report test, which reads more than the SOP class, runs
    every time. At most ``max_classes`` decisions are kept (a peer sending made-up classes
    cannot grow it); the rest are decided each time. Safe to call from several threads.
    """

    def __init__(self, cfg: ReportConfig, max_classes: int = 256) -> None:
        self.cfg = cfg
        self.max_classes = max_classes
        self._decided: dict[tuple[str, bool], Classification] = {}

    def __call__(self, ds: Dataset) -> Classification:
        if is_own_report(ds, self.cfg):
            return _OWN_REPORT
        key = _sop_class_key(ds)
        decided = self._decided.get(key)
        if decided is None:
            decided = classify_sop_class(key[0], has_image_attributes=key[1])
            if len(self._decided) < self.max_classes:
                self._decided[key] = decided
        return decided
