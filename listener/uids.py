"""Deterministic UIDs for the node's reports.

Idempotence of the whole forwarding path rests on these: the same analysis of the
same images by the same model always yields the same SOP Instance UID, so a re-send
after a crash or a retry is a duplicate the PACS ignores, while a changed result
(another image arrived, another model) gets a new UID and therefore a new document.

Every UID is ``2.25.<decimal of a UUID5>`` (ISO/IEC 9834-8, DICOM PS3.5 B.2) under a
namespace fixed for this project. ``pydicom.uid.generate_uid`` is not used: with
``prefix=None`` it returns a random UID even when entropy sources are given.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable

# Generated once with uuid.uuid4() for DSKI Node; never change it, or every report
# UID changes and PACSs receive duplicates of all earlier reports.
NAMESPACE = uuid.UUID("321edabf-f843-4938-a334-fc2e5817eaf0")

_MAX_UID_LENGTH = 64


class UIDError(ValueError):
    """An input to a UID derivation is empty or the result is not a valid UID."""


def _check_uid_input(name: str, value: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UIDError(f"{name} must be a non-empty UID string, got {value!r}")
    return value.strip()


def derive_uid(kind: str, *parts: object) -> str:
    """``2.25.<int>`` from a UUID5 of ``kind`` and ``parts`` under :data:`NAMESPACE`.

    The parts are serialised as JSON, so ``("a", "b|c")`` and ``("a|b", "c")``
    cannot collide the way a joined string could.
    """
    name = json.dumps([kind, *parts], separators=(",", ":"), ensure_ascii=True)
    uid = f"2.25.{uuid.uuid5(NAMESPACE, name).int}"
    if len(uid) > _MAX_UID_LENGTH:  # cannot happen for a 128-bit int; guards against edits
        raise UIDError(f"derived UID {uid} is longer than {_MAX_UID_LENGTH} characters")
    return uid


def report_uid(
    source_series_uid: str | None,
    study_uid: str,
    sop_instance_uids: Iterable[str],
    model_version: str,
    kind: str = "sr",
) -> str:
    """SOP Instance UID of a report on ``sop_instance_uids``.

    ``source_series_uid`` is None for a study-scope report. The SOP Instance UIDs are
    de-duplicated and sorted, so arrival order and duplicate deliveries do not matter.
    ``kind`` separates documents of different types on the same images (e.g. ``"sr"``
    and ``"ko"``).
    """
    study = _check_uid_input("study_uid", study_uid)
    series = None if source_series_uid is None else _check_uid_input("source_series_uid", source_series_uid)
    sops = sorted({_check_uid_input("sop_instance_uid", u) for u in sop_instance_uids})
    if not sops:
        raise UIDError("a report needs at least one source SOP Instance UID")
    if not model_version:
        raise UIDError("model_version must not be empty")
    return derive_uid(f"report/{kind}", study, series, model_version, sops)


def report_series_uid(study_uid: str, source_series_uid: str | None, model_version: str) -> str:
    """Series Instance UID of the report series for one source series (or study) and model.

    Every report on the same source series by the same model lands in one SR series,
    also when late images cause a second report.
    """
    study = _check_uid_input("study_uid", study_uid)
    series = None if source_series_uid is None else _check_uid_input("source_series_uid", source_series_uid)
    if not model_version:
        raise UIDError("model_version must not be empty")
    return derive_uid("report-series", study, series, model_version)


def tracking_uid(report_sop_instance_uid: str, source_sop_instance_uid: str) -> str:
    """Tracking Unique Identifier (TID 4108) of one image's measurement group in a report."""
    return derive_uid(
        "tracking",
        _check_uid_input("report_sop_instance_uid", report_sop_instance_uid),
        _check_uid_input("source_sop_instance_uid", source_sop_instance_uid),
    )


def device_uid(device_name: str) -> str:
    """Device Observer UID (TID 1004) of the node, stable for one configured device name."""
    if not device_name:
        raise UIDError("device_name must not be empty")
    return derive_uid("device", device_name)
