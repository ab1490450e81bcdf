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
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import (
    RawDataElement,
    convert_raw_data_element,
    empty_value_for_VR,
)
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import ENCODED_VR
from pydicom.tag import BaseTag
from pydicom.uid import PrivateTransferSyntaxes
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32
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

    The common case (a complete little endian data set whose structure pydicom would
    read exactly as ``_fast_elements`` walks it) takes the header elements straight
    from one walk over the bytes, and pydicom only decodes their values: the same
    raw elements and encoding as its reader produces, about a tenth of the CPU.
    Anything else goes through ``parse_header_reference`` unchanged.
    """
    fast = _fast_elements(data)
    if fast is None:
        return parse_header_reference(data, max_pixels=max_pixels)
    raw, implicit, transfer_syntax = fast
    try:
        ds = _header_dataset(raw, implicit)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError, LookupError, OSError) as exc:
        raise InvalidObjectError(STATUS_CANNOT_UNDERSTAND, f"not a readable DICOM dataset: {exc}") from exc
    except Exception as exc:  # as parse_header_reference: pydicom raises a wide range on hostile values
        raise InvalidObjectError(STATUS_CANNOT_UNDERSTAND, f"not a readable DICOM dataset: {type(exc).__name__}: {exc}") from exc
    return _checked_header(ds, transfer_syntax, max_pixels)


def parse_header_reference(data: bytes, *, max_pixels: int) -> ObjectHeader:
    """``parse_header`` through pydicom's reader: the fallback for whatever the fast path
    does not vouch for, and the reference the fast path is tested against."""
    return _checked_header(*_read_reference(data), max_pixels)


def _read_reference(data: bytes) -> tuple[Dataset, str]:
    """The header data set as pydicom reads it, and the transfer syntax; raises ``InvalidObjectError``."""
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

    return ds, transfer_syntax


def _checked_header(ds: Dataset, transfer_syntax: str, max_pixels: int) -> ObjectHeader:
    """The validated ``ObjectHeader`` of a header data set read by either path."""
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
    return _walk_elements(data, enc, start, start, None)


def _walk_elements(data: bytes, enc: _Encoding, start: int, pos: int, cut: int | None) -> tuple[str | None, int | None]:
    """``_walk_data_set`` from the top-level element at ``pos`` on (``cut`` found before it, if any)."""
    end = len(data)
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


# --------------------------------------------------------------------------- fast path
#
# ``_fast_elements`` accepts only what pydicom's reader (``dcmread`` with
# ``stop_before_pixels`` and ``specific_tags``, as ``_read_header`` calls it) provably reads
# the same way: File Meta elements in ascending group 0002 order that end exactly where
# the group length says, a little endian transfer syntax that pydicom does not treat
# specially, every explicit VR one that pydicom knows (so it never guesses), the first
# element of the data set and of each item encoded as declared (so pydicom never switches
# between explicit and implicit VR), undefined lengths only on sequences whose items and
# delimiters are well formed, and no header element of undefined length. The data set
# must also be complete as ``_walk_data_set`` sees it. Everything else is left to the
# reference path, so its errors and messages stay what they were.

_ENCODED_VR: frozenset[bytes] = frozenset(vr for vr in ENCODED_VR if len(vr) == 2)
_HEADER_TAG_SET: frozenset[int] = frozenset(int(tag_for_keyword(k) or 0) for k in HEADER_TAGS) | {0x00080005}
_EXPLICIT_LE_UID = "1.2.840.10008.1.2.1"
_TAG_LE = struct.Struct("<HH")
_U16_LE = struct.Struct("<H")
_U32_LE = struct.Struct("<L")
_IMPLICIT_ELEMENT = struct.Struct("<HHL")
_EXPLICIT_ELEMENT = struct.Struct("<HH2sH")
_LONG_VR: frozenset[bytes] = frozenset(vr.encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)
_GROUP_LENGTH_HEADER = b"\x02\x00\x00\x00UL\x04\x00"


class _Unsure(Exception):
    """The fast path cannot vouch that pydicom reads these bytes the same way."""


def _fast_elements(data: bytes) -> tuple[dict[int, RawDataElement], bool, str] | None:
    """(the header's raw elements as pydicom's reader yields them, implicit VR, transfer syntax),
    or None when the reference path must read the object."""
    if data[128:132] != b"DICM" or data[132:140] != _GROUP_LENGTH_HEADER:
        return None
    start = 144 + _U32_LE.unpack_from(data, 140)[0]
    if start + 8 > len(data):
        return None  # empty, or too short for an element: the reference path says why
    try:
        transfer_syntax = _fast_meta(data, start)
        if transfer_syntax in (_BIG_ENDIAN, _DEFLATED) or transfer_syntax in PrivateTransferSyntaxes:
            return None
        implicit = transfer_syntax == _IMPLICIT
        found, cut = _fast_header_elements(data, start, implicit)
    except (_Unsure, struct.error):
        return None
    if cut is not None:
        # the rest must be complete and followable, else the reference path refuses or reads it all
        enc = _Encoding(implicit=implicit, tag="<HH", short="<H", long="<L")
        reason, after = _walk_elements(data, enc, start, cut, cut)
        if reason is not None or after is None:
            return None
    return found, implicit, transfer_syntax


def _fast_meta(data: bytes, start: int) -> str:
    """The Transfer Syntax UID of a File Meta group that pydicom reads exactly to ``start``."""
    pos, previous, transfer_syntax = 144, 0x00020000, None
    while pos < start:
        if pos + 8 > start:
            raise _Unsure
        group, element = _TAG_LE.unpack_from(data, pos)
        tag = group << 16 | element
        if group != 0x0002 or tag <= previous:
            raise _Unsure
        previous = tag
        vr = data[pos + 4 : pos + 6]
        if vr not in _ENCODED_VR:
            raise _Unsure
        if vr.decode("ascii") in EXPLICIT_VR_LENGTH_32:
            length, pos = _U32_LE.unpack_from(data, pos + 8)[0], pos + 12
        else:
            length, pos = _U16_LE.unpack_from(data, pos + 6)[0], pos + 8
        if length == _UNDEFINED or pos + length > start:
            raise _Unsure
        if tag == 0x00020010:
            transfer_syntax = data[pos : pos + length].decode("latin-1").rstrip("\x00 ")
        pos += length
    if pos != start or transfer_syntax is None or not _UID.fullmatch(transfer_syntax):
        raise _Unsure
    if _U16_LE.unpack_from(data, start)[0] in (0x0000, 0x0002):  # pydicom reads a command set or more meta
        raise _Unsure
    return transfer_syntax


def _looks_explicit(data: bytes, pos: int) -> bool:
    """pydicom's test of the first element of a data set: two capital letters where a VR goes."""
    return 0x40 < data[pos + 4] < 0x5B and 0x40 < data[pos + 5] < 0x5B


def _fast_element(data: bytes, pos: int, implicit: bool) -> tuple[int, str | None, int, int]:
    """(tag, VR or None, value offset, value length) of a data element that pydicom reads alike."""
    if pos + 8 > len(data):
        raise _Unsure
    group, element = _TAG_LE.unpack_from(data, pos)
    if group in (0xFFFE, 0x0000):
        raise _Unsure
    if implicit:
        return group << 16 | element, None, pos + 8, _U32_LE.unpack_from(data, pos + 4)[0]
    raw_vr = data[pos + 4 : pos + 6]
    if raw_vr not in _ENCODED_VR:
        raise _Unsure
    vr = raw_vr.decode("ascii")
    if vr in EXPLICIT_VR_LENGTH_32:
        if pos + 12 > len(data):
            raise _Unsure
        return group << 16 | element, vr, pos + 12, _U32_LE.unpack_from(data, pos + 8)[0]
    return group << 16 | element, vr, pos + 8, _U16_LE.unpack_from(data, pos + 6)[0]


def _is_sequence(tag: int, vr: str | None) -> bool:
    """Whether pydicom reads an undefined-length element as a sequence (only the sure cases)."""
    if vr is not None:
        return vr == "SQ"
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def _fast_header_elements(data: bytes, start: int, implicit: bool) -> tuple[dict[int, RawDataElement], int | None]:
    """The header elements before the first top-level tag above ``_LAST_HEADER_TAG``, and that
    tag's offset (None when the data set ends first)."""
    if _looks_explicit(data, start) == implicit:
        raise _Unsure  # pydicom would switch encodings (or refuse)
    found: dict[int, RawDataElement] = {}
    end, pos = len(data), start
    # a CT has some 200 elements before (0028,0011): this loop is the fast path's main cost,
    # hence one unpack per element and the VR decoded only for the elements kept
    unpack = _IMPLICIT_ELEMENT.unpack_from if implicit else _EXPLICIT_ELEMENT.unpack_from
    long_length = _U32_LE.unpack_from
    while pos < end:
        if pos + 8 > end:
            raise _Unsure
        if implicit:
            group, element, length = unpack(data, pos)
            raw_vr, value_pos = None, pos + 8
        else:
            group, element, raw_vr, length = unpack(data, pos)
            if raw_vr in _LONG_VR:
                if pos + 12 > end:
                    raise _Unsure
                length, value_pos = long_length(data, pos + 8)[0], pos + 12
            elif raw_vr in _ENCODED_VR:
                value_pos = pos + 8
            else:
                raise _Unsure
        if group == 0xFFFE or group == 0x0000:
            raise _Unsure
        tag = group << 16 | element
        if tag > _LAST_HEADER_TAG:
            return found, pos
        vr = None if raw_vr is None else raw_vr.decode("ascii")
        if length == _UNDEFINED:
            if tag in _HEADER_TAG_SET or not _is_sequence(tag, vr):
                raise _Unsure
            pos = _fast_sequence(data, value_pos, implicit, 0)
            continue
        pos = value_pos + length
        if pos > end:
            raise _Unsure
        if tag in _HEADER_TAG_SET:
            value = data[value_pos:pos] if length else empty_value_for_VR(vr, raw=True)
            found[tag] = RawDataElement(BaseTag(tag), vr, length, value, value_pos, implicit, True)
    return found, None


def _fast_sequence(data: bytes, pos: int, implicit: bool, depth: int) -> int:
    """Offset after an undefined-length sequence whose first item starts at ``pos``."""
    if depth > _MAX_NESTING:
        raise _Unsure
    while True:
        if pos + 8 > len(data):
            raise _Unsure
        group, element = _TAG_LE.unpack_from(data, pos)
        tag, length = group << 16 | element, _U32_LE.unpack_from(data, pos + 4)[0]
        pos += 8
        if tag == _SEQUENCE_END and length == 0:
            return pos
        if tag != _ITEM:
            raise _Unsure
        if length == _UNDEFINED:
            pos = _fast_item(data, pos, None, implicit, depth + 1)
        else:
            if pos + length > len(data):
                raise _Unsure
            pos = _fast_item(data, pos, pos + length, implicit, depth + 1)


def _fast_item(data: bytes, pos: int, item_end: int | None, implicit: bool, depth: int) -> int:
    """Offset after an item's elements: at ``item_end`` exactly, or after its Item Delimitation."""
    first = True
    while True:
        if item_end is not None and pos >= item_end:
            if pos != item_end:
                raise _Unsure
            return pos
        if pos + 8 > len(data):
            raise _Unsure
        if _TAG_LE.unpack_from(data, pos) == (0xFFFE, 0xE00D):
            if item_end is not None or _U32_LE.unpack_from(data, pos + 4)[0] != 0:
                raise _Unsure
            return pos + 8
        if first and not implicit and not _looks_explicit(data, pos):
            raise _Unsure  # pydicom would read this item as implicit VR
        first = False
        tag, vr, value_pos, length = _fast_element(data, pos, implicit)
        if length == _UNDEFINED:
            if not _is_sequence(tag, vr):
                raise _Unsure
            pos = _fast_sequence(data, value_pos, implicit, depth)
        else:
            pos = value_pos + length
            if pos > (len(data) if item_end is None else item_end):
                raise _Unsure


def _header_dataset(raw: dict[int, RawDataElement], implicit: bool) -> Dataset:
    """The data set pydicom's ``read_dataset`` builds from these raw elements, values checked."""
    ds = Dataset(raw)
    encoding: str | list[str] = default_encoding
    charset = raw.get(0x00080005)
    if charset is not None:
        encoding = convert_encodings(convert_raw_data_element(charset).value)
    ds.set_original_encoding(implicit, True, encoding)
    for keyword in HEADER_TAGS:  # as _read_header: a malformed value fails now
        ds.get(keyword)
    return ds
