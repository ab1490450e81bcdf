"""The node's DICOM listener: C-ECHO and C-STORE for every storage SOP class.

Durable acknowledgement: the C-STORE handler runs in the association's thread and
returns its status only after

1. the encoded bytes exactly as received (plus a File Meta header) are in the spool:
   temporary name, fsync, atomic rename, folder fsync (``storage.spool.Spool.store``);
2. the ``instances`` row pointing at that file is committed
   (``storage.repository.Repository.record_received_batch``). Concurrent associations
   share commits (``storage.batching.GroupCommit``): a handler waits for the commit
   of the batch that holds its row, so each still answers only after its own row is
   durable, and a failed batch commit fails every handler in it (0xA700 when the
   database is unavailable; its spool file is removed as for a single store).

pynetdicom sends the C-STORE response only when the handler returns, so a crash at
any point before step 2 completes leaves the sender without a success status (it
will send again) and at worst an orphan spool file that start-up reconciliation
adopts or quarantines. The dataset is never decoded here: only a few header
elements are parsed from the bytes, and the pixel data is not touched.

Rejected objects (not parseable, missing or malformed UIDs, over the pixel limit)
get a failure status and are NOT kept: the sender still holds them and owns the
retry or the alarm, and keeping unacknowledged bytes from a faulty or hostile peer
would let it fill the disk. The log line names the calling AE, the size, the
sha256 and the reason, which is what an auditor needs to find the object at the
sender.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from io import BytesIO
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    evt,
)
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    StoragePresentationContexts,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from listener.classify import Classification, classify
from listener.config import ListenerConfig, NodeConfig, ReportConfig
from storage.batching import GroupCommit
from storage.errors import DatabaseUnavailableError, SpoolError, SpoolFullError
from storage.repository import ReceivedObject, ReceiveResult

logger = logging.getLogger(__name__)

# DIMSE statuses of the Storage service (PS3.4 B.2.3).
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000  # not a parseable DICOM dataset
STATUS_BAD_UID = 0xC001  # a required UID is missing or malformed
STATUS_UID_MISMATCH = 0xC002  # the dataset's SOP Instance UID differs from the command's
STATUS_TOO_LARGE = 0xC003  # Rows x Columns x Frames over listener.max_pixels
STATUS_PROCESSING_FAILURE = 0x0110

# Everything the listener, the classifier and is_own_report read from a header.
HEADER_TAGS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "Modality",
    "Manufacturer",
    "SeriesDescription",
    "CodingSchemeIdentificationSequence",
    "Rows",
    "Columns",
    "NumberOfFrames",
)

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


class InvalidObjectError(Exception):
    """A received object the node refuses; ``status`` is the DIMSE status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ObjectHeader:
    """The few attributes the listener needs, validated."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient_id: str | None
    modality: str | None
    pixels: int | None  # Rows x Columns x Frames, None when there is no image matrix
    dataset: Dataset  # the parsed header elements, for classification


def valid_uid(value: object) -> str | None:
    """The UID with DICOM padding removed, or None when it is not a UID (charset, length)."""
    if value is None:
        return None
    text = str(value).rstrip("\x00 ").strip()
    if not text or len(text) > 64 or not _UID.fullmatch(text):
        return None
    return text


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).replace("\x00", "").strip()
    return text[:limit] or None


def _int(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise InvalidObjectError(STATUS_CANNOT_UNDERSTAND, f"{keyword} is not a number: {value!r}") from exc


def _read_header(data: bytes) -> Dataset:
    ds = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
    # values are decoded lazily: touch them here so that a malformed one fails now
    for keyword in HEADER_TAGS:
        ds.get(keyword)
    return ds


def parse_header(data: bytes, *, max_pixels: int) -> ObjectHeader:
    """Parse and check the header of an encoded DICOM file (preamble + meta + dataset).

    Reads only ``HEADER_TAGS`` and stops before the pixel data; raises
    ``InvalidObjectError`` with the status to answer.
    """
    # One walk of the element headers finds where the header tags end and whether the data
    # set is complete; pydicom then reads only the bytes up to the last tag it must decode
    # (for a CT with vendor private groups, about half of the elements).
    meta_syntax = _meta_transfer_syntax(data)
    reason, cut = _walk_data_set(data, meta_syntax) if meta_syntax is not None else (None, None)
    try:
        ds = _read_header(data if cut is None else data[:cut])
        transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
        if meta_syntax is None or transfer_syntax != meta_syntax:  # pydicom read the meta otherwise: as it says
            if cut is not None:
                ds = _read_header(data)
            reason = _incomplete_encoding(data, transfer_syntax)
    except InvalidObjectError:
        raise
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError, LookupError, OSError) as exc:
        raise InvalidObjectError(STATUS_CANNOT_UNDERSTAND, f"not a readable DICOM dataset: {exc}") from exc
    except Exception as exc:  # pydicom raises a wide range on hostile input; none may kill the handler
        raise InvalidObjectError(STATUS_CANNOT_UNDERSTAND, f"not a readable DICOM dataset: {type(exc).__name__}: {exc}") from exc

    # pydicom returns the bytes that are there when the data set ends inside an element: a
    # truncated object would otherwise be acknowledged with its last value (a UID) cut short.
    if reason is not None:
        raise InvalidObjectError(STATUS_CANNOT_UNDERSTAND, reason)

    uids: dict[str, str] = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        raw = ds.get(keyword)
        uid = valid_uid(raw)
        if uid is None:
            what = "missing" if raw in (None, "") else f"not a valid UID: {str(raw)[:80]!r}"
            raise InvalidObjectError(STATUS_BAD_UID, f"{keyword} {what}")
        uids[keyword] = uid

    try:
        rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
        frames = _int(ds, "NumberOfFrames") or 1
        pixels = None
        if rows is not None and columns is not None:
            if rows < 0 or columns < 0 or frames < 0:
                raise InvalidObjectError(STATUS_CANNOT_UNDERSTAND, f"negative image size {rows}x{columns}x{frames}")
            pixels = rows * columns * frames
            if pixels > max_pixels:
                raise InvalidObjectError(
                    STATUS_TOO_LARGE, f"image {rows}x{columns}x{frames} exceeds the limit of {max_pixels} pixels"
                )
        patient_id = _text(ds, "PatientID", 64)
        modality = _text(ds, "Modality", 16)
    except InvalidObjectError:
        raise
    except Exception as exc:
        raise InvalidObjectError(STATUS_CANNOT_UNDERSTAND, f"unreadable header value: {type(exc).__name__}: {exc}") from exc

    return ObjectHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=valid_uid(transfer_syntax) or "",
        patient_id=patient_id,
        modality=modality,
        pixels=pixels,
        dataset=ds,
    )


_VR_LONG = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_UNDEFINED = 0xFFFFFFFF
_DEFLATED = "1.2.840.10008.1.2.1.99"
_IMPLICIT = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
# The highest tag in HEADER_TAGS, (0028,0011) Columns: pydicom need not see what follows it.
_LAST_HEADER_TAG = 0x00280011


def _data_set_start(data: bytes) -> int | None:
    """Offset of the data set after a File Meta group with its standard group length, else None."""
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00" or data[136:138] != b"UL":
        return None
    return 144 + int.from_bytes(data[140:144], "little")


def _meta_transfer_syntax(data: bytes) -> str | None:
    """The Transfer Syntax UID of the File Meta group (always explicit VR little endian), or None."""
    start = _data_set_start(data)
    if start is None:
        return None
    pos, end = 144, min(start, len(data))
    while pos + 8 <= end:
        group, element, vr = struct.unpack_from("<HH2s", data, pos)
        if vr in _VR_LONG:
            if pos + 12 > end:
                return None
            length, header = struct.unpack_from("<L", data, pos + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", data, pos + 6)[0], 8
        if (group, element) == (0x0002, 0x0010):
            return data[pos + header : pos + header + length].decode("ascii", "replace").rstrip("\x00 ")
        pos += header + length
    return None


@dataclass(frozen=True)
class _Encoding:
    implicit: bool
    tag: str  # struct format of (group, element)
    short: str  # 2-byte length
    long: str  # 4-byte length


_MAX_NESTING = 16  # sequences nested deeper than this are left to pydicom (hostile input)
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def _element_header(data: bytes, pos: int, enc: _Encoding) -> tuple[int, int, int] | None:
    """(tag, header size, value length) of the element at ``pos``; None when its header does not fit."""
    if pos + 8 > len(data):
        return None
    group, element = struct.unpack_from(enc.tag, data, pos)
    if enc.implicit or group == 0xFFFE:  # items and delimiters have no VR in either encoding
        return group << 16 | element, 8, struct.unpack_from(enc.long, data, pos + 4)[0]
    if data[pos + 4 : pos + 6] in _VR_LONG:
        if pos + 12 > len(data):
            return None
        return group << 16 | element, 12, struct.unpack_from(enc.long, data, pos + 8)[0]
    return group << 16 | element, 8, struct.unpack_from(enc.short, data, pos + 6)[0]


def _skip_sequence(data: bytes, pos: int, enc: _Encoding, depth: int) -> int | None:
    """Offset just after an undefined-length sequence (or encapsulated pixel data) whose first
    item starts at ``pos``; None when it cannot be followed with certainty."""
    if depth > _MAX_NESTING:
        return None
    while pos + 8 <= len(data):
        group, element = struct.unpack_from(enc.tag, data, pos)
        tag, length = group << 16 | element, struct.unpack_from(enc.long, data, pos + 4)[0]
        pos += 8
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            return None
        if length != _UNDEFINED:
            pos += length
            continue
        item_end = _skip_item(data, pos, enc, depth + 1)
        if item_end is None:
            return None
        pos = item_end
    return None


def _skip_item(data: bytes, pos: int, enc: _Encoding, depth: int) -> int | None:
    """Offset just after the Item Delimitation of an undefined-length item whose elements start at ``pos``."""
    while True:
        header = _element_header(data, pos, enc)
        if header is None:
            return None
        tag, size, length = header
        if tag == _ITEM_END:
            return pos + 8
        if length == _UNDEFINED:
            after = _skip_sequence(data, pos + size, enc, depth)
            if after is None:
                return None
            pos = after
        else:
            pos += size + length
        if pos > len(data):
            return None


def _walk_data_set(data: bytes, transfer_syntax: str) -> tuple[str | None, int | None]:
    """One pass over the top-level element headers after the File Meta (values skipped, never decoded).

    Returns (why the data set is empty or ends inside an element, else None; the offset
    of the first top-level element after ``_LAST_HEADER_TAG``, else None). Sequences
    and encapsulated pixel data of undefined length are stepped over item by item; one
    that cannot be followed (truncated, malformed, or nested deeper than
    ``_MAX_NESTING``) ends the walk with (None, None): no offset, so that pydicom reads
    the whole data set and its errors refuse the object as they always did.
    Deflated data sets are not walked.
    """
    start = _data_set_start(data)
    if start is None:
        return None, None  # no standard meta group length to find the data set by: leave it to the parser
    if start >= len(data):
        return "empty data set", None
    if transfer_syntax == _DEFLATED:
        return None, None
    big = transfer_syntax == _BIG_ENDIAN
    enc = _Encoding(
        implicit=transfer_syntax == _IMPLICIT,
        tag=">HH" if big else "<HH",
        short=">H" if big else "<H",
        long=">L" if big else "<L",
    )
    end, pos, cut = len(data), start, None
    while pos < end:
        header = 8 if enc.implicit else (12 if data[pos + 4 : pos + 6] in _VR_LONG else 8)
        if pos + header > end:
            return f"data set truncated inside an element header at byte {pos - start}", cut
        group, element = struct.unpack_from(enc.tag, data, pos)
        if cut is None and (group << 16 | element) > _LAST_HEADER_TAG:
            cut = pos
        if enc.implicit:
            length = struct.unpack_from(enc.long, data, pos + 4)[0]
        elif header == 8:
            length = struct.unpack_from(enc.short, data, pos + 6)[0]
        else:
            length = struct.unpack_from(enc.long, data, pos + 8)[0]
        if length == _UNDEFINED:
            after = _skip_sequence(data, pos + header, enc, 0)
            if after is None:  # not followed to its end: pydicom must read everything, as it did before
                return None, None
            pos = after
            continue
        if pos + header + length > end:
            return (
                f"data set truncated: element ({group:04X},{element:04X}) declares {length} bytes, "
                f"{end - pos - header} present"
            ), cut
        pos += header + length
    return None, cut


def _incomplete_encoding(data: bytes, transfer_syntax: str) -> str | None:
    """Why the data set after the File Meta is empty or ends inside an element, else None."""
    return _walk_data_set(data, transfer_syntax)[0]


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (the encoding of every File Meta element)."""
    if vr == b"OB":
        return struct.pack("<HH2s2xL", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, prefix and File Meta group exactly as pynetdicom's ``Event.encoded_dataset``
    writes them, built directly: pydicom's writer costs about a tenth of a store's CPU."""
    body = b"".join((
        _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, 0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
        _element(0x0002, 0x0003, b"UI", _padded(sop_instance_uid, b"\x00")),
        _element(0x0002, 0x0010, b"UI", _padded(transfer_syntax_uid, b"\x00")),
        _element(0x0002, 0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _element(0x0002, 0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ))
    return b"\x00" * 128 + b"DICM" + _element(0x0002, 0x0000, b"UL", struct.pack("<L", len(body))) + body


def encoded_with_meta(event: evt.Event) -> bytes:
    """The C-STORE data set as received, behind a File Meta header (as ``event.encoded_dataset()``).

    The header is built directly when the request's UIDs are clean UIDs; anything else
    (padding, odd characters from a faulty peer) goes through pynetdicom as before.
    """
    request = event.request
    uids = (str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or ""),
            str(event.context.transfer_syntax or ""))
    if all(valid_uid(u) == u for u in uids):
        return file_meta_bytes(*uids) + event.encoded_dataset(include_meta=False)
    return event.encoded_dataset(include_meta=True)


# --------------------------------------------------------------------------- storage seam


class SpoolLike(Protocol):
    def store(self, data: bytes) -> Any: ...

    def delete(self, path: Any) -> bool: ...


class RepositoryLike(Protocol):
    def record_received(self, **kwargs: Any) -> Any: ...


def _item_failure(exc: BaseException) -> bool:
    """A batch failure that one object can cause (not the database being unavailable)."""
    return not isinstance(exc, DatabaseUnavailableError)


def _receive_committer(repo: RepositoryLike) -> Callable[[ReceivedObject], ReceiveResult]:
    """How the handler records one object: through a group commit where the repository can
    record a batch in one transaction (``Repository.record_received_batch``), else one
    ``record_received`` call per object (e.g. a wrapper in tests)."""
    batch = getattr(repo, "record_received_batch", None)
    if callable(batch):
        return GroupCommit(batch, isolate_failures=_item_failure).submit
    return lambda obj: repo.record_received(**{f.name: getattr(obj, f.name) for f in fields(ReceivedObject)})


def _status(code: int, comment: str) -> Dataset:
    """A status dataset with an Error Comment (LO: at most 64 characters) for the sender's log."""
    rsp = Dataset()
    rsp.Status = code
    if code != STATUS_SUCCESS and comment:
        rsp.ErrorComment = comment.replace("\\", "/")[:64]
    return rsp


class StoreHandler:
    """The C-STORE handler. Holds only immutable references, so pynetdicom may call
    it from many association threads at once; Spool and Repository are thread-safe."""

    def __init__(
        self,
        spool: SpoolLike,
        repo: RepositoryLike,
        *,
        max_pixels: int,
        report_cfg: ReportConfig,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        self._spool = spool
        self._max_pixels = max_pixels
        self._report_cfg = report_cfg
        self._on_stored = on_stored  # e.g. wake the workers; called after the commit
        # concurrent associations share one database commit (storage.batching.GroupCommit)
        self._record = _receive_committer(repo)

    def __call__(self, event: evt.Event) -> Dataset:
        calling_ae = str(event.assoc.requestor.ae_title or "").strip()
        peer = f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"
        try:
            data = encoded_with_meta(event)
        except Exception as exc:  # pragma: no cover - pynetdicom hands us a request without a data set
            logger.error("C-STORE without a data set", extra={"calling_ae": calling_ae, "error": str(exc)})
            return _status(STATUS_CANNOT_UNDERSTAND, "no data set")
        try:
            return self._store(event, data, calling_ae, peer)
        except Exception as exc:  # a bug must cost one store, never the association thread
            logger.exception("C-STORE handler failed", extra={"calling_ae": calling_ae, "peer": peer})
            return _status(STATUS_PROCESSING_FAILURE, f"processing failure: {type(exc).__name__}")

    def _store(self, event: evt.Event, data: bytes, calling_ae: str, peer: str) -> Dataset:
        try:
            header = parse_header(data, max_pixels=self._max_pixels)
            command_sop_instance = valid_uid(event.request.AffectedSOPInstanceUID)
            command_sop_class = valid_uid(event.request.AffectedSOPClassUID)
            if command_sop_class and command_sop_class != header.sop_class_uid:
                raise InvalidObjectError(
                    STATUS_SOP_CLASS_MISMATCH,
                    f"data set SOP class {header.sop_class_uid} differs from the request's {command_sop_class}",
                )
            if command_sop_instance and command_sop_instance != header.sop_instance_uid:
                raise InvalidObjectError(
                    STATUS_UID_MISMATCH,
                    f"data set SOP instance {header.sop_instance_uid} differs from the request's {command_sop_instance}",
                )
        except InvalidObjectError as exc:
            logger.warning(
                "refused object",
                extra={
                    "calling_ae": calling_ae,
                    "peer": peer,
                    "status": f"0x{exc.status:04X}",
                    "reason": exc.reason,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                },
            )
            return _status(exc.status, exc.reason)

        classification: Classification = classify(header.dataset, self._report_cfg)

        try:
            entry = self._spool.store(data)
        except SpoolFullError as exc:
            logger.error("spool full, store refused", extra={"calling_ae": calling_ae, "reason": str(exc)})
            return _status(STATUS_OUT_OF_RESOURCES, "out of resources: spool full")
        except SpoolError as exc:
            logger.error("spool write failed, store refused", extra={"calling_ae": calling_ae, "reason": str(exc)})
            return _status(STATUS_OUT_OF_RESOURCES, "out of resources: spool write failed")

        try:
            result = self._record(ReceivedObject(
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                study_instance_uid=header.study_instance_uid,
                series_instance_uid=header.series_instance_uid,
                patient_id=header.patient_id,
                modality=header.modality,
                transfer_syntax_uid=header.transfer_syntax_uid,
                calling_ae=calling_ae,
                peer_address=peer,
                spool_path=str(entry.path),
                sha256=entry.sha256,
                size_bytes=entry.size,
                status="received" if classification.analyse else "skipped",
                reason=None if classification.analyse else classification.reason,
            ))
        except DatabaseUnavailableError as exc:
            self._discard(entry.path)
            logger.error("database unavailable, store refused", extra={"calling_ae": calling_ae, "reason": str(exc)})
            return _status(STATUS_OUT_OF_RESOURCES, "out of resources: database unavailable")
        except BaseException:
            self._discard(entry.path)
            raise

        if result.duplicate:
            # same SOP Instance UID and same bytes: already held, the new copy is redundant
            self._discard(entry.path)
        elif classification.analyse and self._on_stored is not None:
            try:
                self._on_stored()
            except Exception:  # committed: the status must be success whatever a listener does
                logger.exception("on_stored callback failed")
        logger.info(
            "stored instance",
            extra={
                "sop_instance_uid": header.sop_instance_uid,
                "series_instance_uid": header.series_instance_uid,
                "instance_id": result.instance_id,
                "duplicate": result.duplicate,
                "kind": classification.kind,
                "calling_ae": calling_ae,
            },
        )
        return _status(STATUS_SUCCESS, "")

    def _discard(self, path: Any) -> None:
        try:
            self._spool.delete(path)
        except Exception as exc:  # reconciliation quarantines what is left
            logger.error("cannot remove spool file", extra={"path": str(path), "error": str(exc)})


# --------------------------------------------------------------------------- association policy


class AssociationPolicy:
    """Calling-AE allow-list with optional host binding, checked when the request arrives.

    Runs as an EVT_REQUESTED handler: pynetdicom lets it send the A-ASSOCIATE-RJ
    itself, with "calling AE title not recognised" (permanent, service user, 3) for
    an unknown title and for a known title from the wrong address.
    """

    def __init__(self, cfg: ListenerConfig, resolve: Callable[[str], set[str]] | None = None) -> None:
        self._required = cfg.require_known_calling_ae
        resolve = resolve or _resolve_host
        allowed: dict[str, set[str] | None] = {}
        for entry in cfg.calling_aes:
            if entry.host is None:
                allowed[entry.ae_title] = None  # an entry without host: any address
            elif entry.ae_title not in allowed or allowed[entry.ae_title] is not None:
                allowed[entry.ae_title] = (allowed.get(entry.ae_title) or set()) | resolve(entry.host)
        self._allowed = allowed

    def permits(self, calling_ae: str, address: str) -> bool:
        if not self._required:
            return True
        title = calling_ae.strip()
        if title not in self._allowed:
            return False
        hosts = self._allowed[title]
        return hosts is None or _normalise_address(address) in hosts

    def __call__(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title or "").strip()
        address = str(assoc.requestor.address)
        try:
            allowed = self.permits(calling, address)
        except Exception:  # an error here must not let the association through
            logger.exception("association policy failed", extra={"calling_ae": calling, "peer": address})
            allowed = False
        if allowed:
            return
        logger.warning("association rejected: calling AE not recognised", extra={"calling_ae": calling, "peer": address})
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        assoc.kill()


def _normalise_address(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _resolve_host(host: str) -> set[str]:
    """Addresses of a configured host (an IP address or a name, resolved once at start-up)."""
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        raise ValueError(f"listener.calling_aes: cannot resolve host {host!r}: {exc}") from exc
    return {_normalise_address(str(info[4][0])) for info in infos}


# --------------------------------------------------------------------------- the AE


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pynetdicom knows, current and retired."""
    uids = {cx.abstract_syntax for cx in AllStoragePresentationContexts}
    uids |= {cx.abstract_syntax for cx in StoragePresentationContexts}
    return sorted(str(u) for u in uids if u)


def _server_ssl_context(cfg: ListenerConfig) -> ssl.SSLContext | None:
    tls = cfg.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(tls.ca_certificates))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else (
        ssl.CERT_OPTIONAL if tls.ca_certificates is not None else ssl.CERT_NONE
    )
    return context


def set_poll_interval(assoc: Any, seconds: float) -> None:
    """Set how long the association's DUL thread sleeps between socket polls when idle.

    pynetdicom 3.0 has no public setting for it: ``DULServiceProvider._run_loop_delay``
    (1 ms) is a private attribute, read on every loop. A store's request waits for up
    to one such sleep before it is read, and its response for up to another before it
    is sent, so at 1 ms it bounds one association to a few hundred stores per second.
    Guarded, so that a pynetdicom without the attribute keeps its own default.
    """
    dul = getattr(assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = seconds


def association_tuning(cfg: ListenerConfig) -> tuple[Any, Callable[[evt.Event], None]]:
    """The (event, handler) pair that applies ``cfg.poll_interval_seconds`` to every new association."""

    def on_open(event: evt.Event) -> None:
        set_poll_interval(event.assoc, cfg.poll_interval_seconds)

    return evt.EVT_CONN_OPEN, on_open


def build_ae(cfg: ListenerConfig) -> AE:
    ae = AE(ae_title=cfg.ae_title)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for uid in storage_sop_classes():
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    # pynetdicom's own check stays as a second line behind AssociationPolicy
    if cfg.require_known_calling_ae and cfg.calling_aes:
        ae.require_calling_aet = sorted({c.ae_title for c in cfg.calling_aes})
    ae.require_called_aet = cfg.require_called_ae_title
    ae.maximum_associations = cfg.max_associations
    ae.acse_timeout = cfg.acse_timeout_seconds
    ae.dimse_timeout = cfg.dimse_timeout_seconds
    ae.network_timeout = cfg.network_timeout_seconds
    ae.maximum_pdu_size = cfg.max_pdu_bytes
    return ae


class StorageSCP:
    """The listening AE: ``start()`` returns once the port is bound; ``stop()`` drains."""

    def __init__(
        self, cfg: NodeConfig, spool: SpoolLike, repo: RepositoryLike, *, on_stored: Callable[[], None] | None = None
    ) -> None:
        self._cfg = cfg.listener
        self._policy = AssociationPolicy(cfg.listener)
        self._handler = StoreHandler(
            spool, repo, max_pixels=cfg.listener.max_pixels, report_cfg=cfg.report, on_stored=on_stored
        )
        self._ae = build_ae(cfg.listener)
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the listener is not running")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self, extra_handlers: Sequence[tuple[Any, Callable[..., Any]]] = ()) -> None:
        """Bind and serve in pynetdicom's threads; ``extra_handlers`` are (event, handler) pairs
        bound as well (notification events: observers, e.g. in tests)."""
        with self._lock:
            if self._server is not None:
                return
            handlers = [
                (evt.EVT_REQUESTED, self._policy),
                (evt.EVT_C_ECHO, _handle_echo),
                (evt.EVT_C_STORE, self._handler),
                association_tuning(self._cfg),
                *extra_handlers,
            ]
            self._server = self._ae.start_server(
                (self._cfg.host, self._cfg.port),
                block=False,
                evt_handlers=handlers,
                ssl_context=_server_ssl_context(self._cfg),
            )
        logger.info(
            "listening",
            extra={"ae_title": self._cfg.ae_title, "host": self._cfg.host, "port": self.address[1]},
        )

    def active_associations(self) -> int:
        return len([a for a in self._ae.active_associations if a.is_acceptor])

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop accepting associations, let open ones finish (up to the grace period), then abort the rest.

        A store whose handler is running when the association is aborted still
        completes its write and commit; only its response is lost, so the sender
        re-sends and the copy is recognised as a duplicate.
        """
        grace = self._cfg.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # closes the listening socket: no new association from here
        deadline = threading.Event()
        waited = 0.0
        while self.active_associations() and waited < grace:
            deadline.wait(0.1)
            waited += 0.1
        remaining = [a for a in self._ae.active_associations if a.is_acceptor]
        for assoc in remaining:
            logger.warning("aborting association at shutdown", extra={"calling_ae": assoc.requestor.ae_title})
            assoc.abort()
        logger.info("listener stopped", extra={"aborted": len(remaining)})


def _handle_echo(event: evt.Event) -> int:
    return STATUS_SUCCESS
