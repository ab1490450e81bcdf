"""What the listener reads of a received object: a few header elements, validated.

The data set is never decoded as a whole: a walk over the element headers finds where
the header tags end, and pydicom parses only those bytes. The File Meta header the
spool file gets is built here too.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from listener.dimse import STATUS_BAD_UID, STATUS_CANNOT_UNDERSTAND, STATUS_TOO_LARGE

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
