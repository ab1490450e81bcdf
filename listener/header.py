"""What the listener reads of a received object: a few header elements, validated.

The data set is never decoded as a whole: a walk over the element headers finds where
the header tags end, and pydicom parses only those bytes; in the common case the walk
collects the header elements itself and only their values that are not plain go to
pydicom. The File Meta header the spool file gets is built here too.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from io import BytesIO
from types import MappingProxyType
from typing import Any, NamedTuple

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom import hooks as pydicom_hooks
from pydicom.charset import convert_encodings, default_encoding, python_encoding
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import (
    DataElement,
    RawDataElement,
    convert_raw_data_element,
    empty_value_for_VR,
)
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import ENCODED_VR
from pydicom.tag import BaseTag
from pydicom.uid import UID, PrivateTransferSyntaxes
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, IS
from pydicom.values import convert_string
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from listener.dicom_walk import (
    BIG_ENDIAN,
    DEFLATED,
    IMPLICIT,
    ITEM,
    MAX_NESTING,
    SEQUENCE_END,
    UNDEFINED_LENGTH,
    VR_LONG,
    Encoding,
    data_set_start,
    encoding_for,
    meta_transfer_syntax,
    skip_sequence,
)
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

_UID_CHARACTERS = re.compile(r"[0-9.]+")
_NO_UIDS: Mapping[str, str] = MappingProxyType({})


def _is_uid_text(text: str) -> bool:
    """Whether ``text`` matches ``[0-9]+(\\.[0-9]+)*``: digits in components separated by single
    dots. Tested thus, not with that pattern, whose backtracking at every dot costs three times
    as much (five UIDs an object)."""
    return (
        _UID_CHARACTERS.fullmatch(text) is not None and text[0] != "." and text[-1] != "." and ".." not in text
    )


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
    if not text or len(text) > 64 or not _is_uid_text(text):
        return None
    return text


def _text(value: object, limit: int) -> str | None:
    if value is None:
        return None
    text = str(value).replace("\x00", "").strip()
    return text[:limit] or None


def _int(value: object, keyword: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)  # type: ignore[call-overload]
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
    from one walk over the bytes; their plain values are decoded here (``_header_dataset``),
    the others by pydicom from the same raw elements and encoding as its reader
    produces. Anything else goes through ``parse_header_reference`` unchanged.
    """
    fast = _fast_elements(data)
    if fast is None:
        return parse_header_reference(data, max_pixels=max_pixels)
    found, implicit, transfer_syntax = fast
    try:
        ds, values, uids = _header_dataset(data, found, implicit)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OverflowError, LookupError, OSError) as exc:
        raise InvalidObjectError(STATUS_CANNOT_UNDERSTAND, f"not a readable DICOM dataset: {exc}") from exc
    except Exception as exc:  # as parse_header_reference: pydicom raises a wide range on hostile values
        raise InvalidObjectError(STATUS_CANNOT_UNDERSTAND, f"not a readable DICOM dataset: {type(exc).__name__}: {exc}") from exc
    if len(transfer_syntax) <= 64:  # valid_uid's: _fast_meta took only UID text, without padding
        uids["TransferSyntaxUID"] = transfer_syntax
    return _checked_header(ds, values.get, transfer_syntax, max_pixels, uids)


def parse_header_reference(data: bytes, *, max_pixels: int) -> ObjectHeader:
    """``parse_header`` through pydicom's reader: the fallback for whatever the fast path
    does not vouch for, and the reference the fast path is tested against."""
    ds, transfer_syntax = _read_reference(data)
    return _checked_header(ds, ds.get, transfer_syntax, max_pixels)


def _read_reference(data: bytes) -> tuple[Dataset, str]:
    """The header data set as pydicom reads it, and the transfer syntax; raises ``InvalidObjectError``."""
    # One walk of the element headers finds where the header tags end and whether the data
    # set is complete; pydicom then reads only the bytes up to the last tag it must decode
    # (for a CT with vendor private groups, about half of the elements).
    meta_syntax = meta_transfer_syntax(data)
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


def _checked_header(
    ds: Dataset,
    get: Callable[[str], Any],
    transfer_syntax: str,
    max_pixels: int,
    valid_uids: Mapping[str, str] = _NO_UIDS,
) -> ObjectHeader:
    """The validated ``ObjectHeader`` of a header data set read by either path; ``get(keyword)``
    is ``ds.get(keyword)`` (the fast path has the values at hand: ``Dataset.get`` costs
    microseconds a call), ``valid_uids`` what ``valid_uid`` gives for some of the UIDs, by
    keyword, ``TransferSyntaxUID`` for ``transfer_syntax`` (the fast path has validated them
    as strictly already)."""
    uids: dict[str, str] = {}
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        known = valid_uids.get(keyword)
        if known is not None:
            uids[keyword] = known
            continue
        raw = get(keyword)
        uid = valid_uid(raw)
        if uid is None:
            what = "missing" if raw in (None, "") else f"not a valid UID: {str(raw)[:80]!r}"
            raise InvalidObjectError(STATUS_BAD_UID, f"{keyword} {what}")
        uids[keyword] = uid

    try:
        rows, columns = _int(get("Rows"), "Rows"), _int(get("Columns"), "Columns")
        frames = _int(get("NumberOfFrames"), "NumberOfFrames") or 1
        pixels = None
        if rows is not None and columns is not None:
            if rows < 0 or columns < 0 or frames < 0:
                raise InvalidObjectError(STATUS_CANNOT_UNDERSTAND, f"negative image size {rows}x{columns}x{frames}")
            pixels = rows * columns * frames
            if pixels > max_pixels:
                raise InvalidObjectError(
                    STATUS_TOO_LARGE, f"image {rows}x{columns}x{frames} exceeds the limit of {max_pixels} pixels"
                )
        patient_id = _text(get("PatientID"), 64)
        modality = _text(get("Modality"), 16)
    except InvalidObjectError:
        raise
    except Exception as exc:
        raise InvalidObjectError(STATUS_CANNOT_UNDERSTAND, f"unreadable header value: {type(exc).__name__}: {exc}") from exc

    return ObjectHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=valid_uids.get("TransferSyntaxUID") or valid_uid(transfer_syntax) or "",
        patient_id=patient_id,
        modality=modality,
        pixels=pixels,
        dataset=ds,
    )


# The highest tag in HEADER_TAGS, (0028,0011) Columns: pydicom need not see what follows it.
_LAST_HEADER_TAG = 0x00280011




def _walk_data_set(data: bytes, transfer_syntax: str) -> tuple[str | None, int | None]:
    """One pass over the top-level element headers after the File Meta (values skipped, never decoded).

    Returns (why the data set is empty or ends inside an element, else None; the offset
    of the first top-level element after ``_LAST_HEADER_TAG``, else None). Sequences
    and encapsulated pixel data of undefined length are stepped over item by item; one
    that cannot be followed (truncated, malformed, or nested deeper than
    ``MAX_NESTING``) ends the walk with (None, None): no offset, so that pydicom reads
    the whole data set and its errors refuse the object as they always did.
    Deflated data sets are not walked.
    """
    start = data_set_start(data)
    if start is None:
        return None, None  # no standard meta group length to find the data set by: leave it to the parser
    if start >= len(data):
        return "empty data set", None
    if transfer_syntax == DEFLATED:
        return None, None
    return _walk_elements(data, encoding_for(transfer_syntax), start, start, None)


def _walk_elements(data: bytes, enc: Encoding, start: int, pos: int, cut: int | None) -> tuple[str | None, int | None]:
    """``_walk_data_set`` from the top-level element at ``pos`` on (``cut`` found before it, if any)."""
    end = len(data)
    while pos < end:
        header = 8 if enc.implicit else (12 if data[pos + 4 : pos + 6] in VR_LONG else 8)
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
        if length == UNDEFINED_LENGTH:
            after = skip_sequence(data, pos + header, enc, 0)
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
_CHARSET_TAG = 0x00080005
_TAG_LE = struct.Struct("<HH")
_U16_LE = struct.Struct("<H")
_U32_LE = struct.Struct("<L")
_IMPLICIT_ELEMENT = struct.Struct("<HHL")
_EXPLICIT_ELEMENT = struct.Struct("<HH2sH")
_LONG_VR: frozenset[bytes] = frozenset(vr.encode("ascii") for vr in EXPLICIT_VR_LENGTH_32)
_SHORT_VR: frozenset[bytes] = _ENCODED_VR - _LONG_VR
_VR_LENGTH = struct.Struct("<4x2sH")  # (VR, 2-byte length) of an explicit VR element
_IMPLICIT_LENGTH = struct.Struct("<4xL")
_GROUP_LENGTH_HEADER = b"\x02\x00\x00\x00UL\x04\x00"
_LE_EXPLICIT = Encoding(implicit=False, tag="<HH", short="<H", long="<L")
_LE_IMPLICIT = Encoding(implicit=True, tag="<HH", short="<H", long="<L")

# A header element as the walk finds it: (explicit VR or None, value offset, value length).
_Found = tuple[bytes | None, int, int]


class _Unsure(Exception):
    """The fast path cannot vouch that pydicom reads these bytes the same way."""


def _fast_elements(data: bytes) -> tuple[dict[int, _Found], bool, str] | None:
    """(the header elements where pydicom's reader finds them, implicit VR, transfer syntax),
    or None when the reference path must read the object."""
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:140] != _GROUP_LENGTH_HEADER:
        return None  # (0002,0000) cut inside its value: the reference path says why
    start = 144 + _U32_LE.unpack_from(data, 140)[0]
    if start + 8 > len(data):
        return None  # empty, or too short for an element: the reference path says why
    try:
        transfer_syntax = _fast_meta(data, start)
        if transfer_syntax in (BIG_ENDIAN, DEFLATED) or transfer_syntax in PrivateTransferSyntaxes:
            return None
        implicit = transfer_syntax == IMPLICIT
        if _looks_explicit(data, start) == implicit:
            return None  # pydicom would switch encodings (or refuse)
        if implicit:
            found, cut = _fast_implicit_header(data, start)
        else:
            found, cut = _fast_explicit_header(data, start)
        # the rest must be complete and followable, else the reference path refuses or reads it all
        if cut is not None and not _rest_complete(data, cut, implicit):
            return None
    except (_Unsure, struct.error):  # struct.error: an element runs past the end of the bytes
        return None
    return found, implicit, transfer_syntax


def _fast_meta(data: bytes, start: int) -> str:
    """The Transfer Syntax UID of a File Meta group that pydicom reads exactly to ``start``."""
    standard = _STANDARD_META.fullmatch(data, 144, start)
    if standard is None:
        transfer_syntax = _walk_meta(data, start)
    else:  # the elements pydicom and pynetdicom write, in order: the walk would find the same
        value_start, value_end = standard.span(1)
        transfer_syntax = data[value_start + 2 : value_end].decode("latin-1").rstrip("\x00 ")
    # the two little endian syntaxes are UID text: they are spared the test
    if not (transfer_syntax in _LITTLE_ENDIAN_SYNTAXES or _is_uid_text(transfer_syntax)):
        raise _Unsure
    if data[start + 1] == 0 and data[start] in (0x00, 0x02):  # pydicom reads a command set or more meta
        raise _Unsure
    return transfer_syntax


def _walk_meta(data: bytes, start: int) -> str:
    """The Transfer Syntax UID of File Meta elements in ascending order that end exactly at ``start``."""
    pos, previous, transfer_syntax = 144, 0x00020000, None
    unpack = _EXPLICIT_ELEMENT.unpack_from
    while pos < start:
        if pos + 8 > start:
            raise _Unsure
        group, element, vr, length = unpack(data, pos)
        tag = group << 16 | element
        if group != 0x0002 or tag <= previous:
            raise _Unsure
        previous = tag
        if vr in _SHORT_VR:
            pos += 8
        elif vr in _LONG_VR:
            length, pos = _U32_LE.unpack_from(data, pos + 8)[0], pos + 12
        else:
            raise _Unsure
        if length == UNDEFINED_LENGTH or pos + length > start:
            raise _Unsure
        if tag == 0x00020010:
            transfer_syntax = data[pos : pos + length].decode("latin-1").rstrip("\x00 ")
        pos += length
    if pos != start or transfer_syntax is None:
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


# A CT has some 270 elements, 200 of them before (0028,0011): walking them one loop
# iteration each (some 2,500 machine instructions) was most of the fast path's cost. Nearly
# all of them need no more than a step over: a short value, a tag that is no header tag, no
# command group element, not past (0028,0011). The ``_*_RUN`` patterns step over a run of
# such elements in C (a third of the instructions); every other element (a header tag, a
# long VR, a longer or odd value length, a value that runs past the end, anything the loops
# refuse or decide on) ends the run, and the loops take it as they always did. In the loops,
# one unpack per element, the VR left as bytes, the group checks only where they can matter,
# and the bounds left to struct: struct.error when an element header runs past the end of
# the bytes (a value that does is caught by the next header, or by ``pos != end``), the
# normal end being the one at ``pos == end`` exactly.

# The longest value a run steps over. Each length is one alternative of the patterns, tried
# in turn, and a longer value is rare in a header: left to the loop, it keeps the patterns
# small (the engine reads a pattern's code as data, cold in the cache on the receive path).
_RUN_MAX_LENGTH = 64


def _byte_pattern(values: bytes) -> bytes:
    """A pattern matching exactly these bytes (escaped, so that none is a metacharacter)."""
    return b"".join(b"\\x%02x" % value for value in values)


def _alternatives(patterns: list[bytes]) -> bytes:
    return b"(?:" + b"|".join(patterns) + b")"


def _length_and_value_pattern(length_size: int) -> bytes:
    """An even little endian value length of ``length_size`` bytes up to ``_RUN_MAX_LENGTH``
    (DICOM pads values to even lengths), followed by exactly that many value bytes."""
    return _alternatives([
        _byte_pattern(n.to_bytes(length_size, "little")) + b".{%d}" % n for n in range(0, _RUN_MAX_LENGTH + 1, 2)
    ])


def _vr_pattern(vrs: frozenset[bytes]) -> bytes:
    """One of these two-letter VRs: an alternative per first letter, tried in turn, the
    letters of the VRs most elements have first (SS, SL, SH, DS, LO, US, UL: tried fewer)."""
    by_first: dict[int, list[int]] = {}
    for vr in sorted(vrs):
        by_first.setdefault(vr[0], []).append(vr[1])
    order = b"SDLUCFITPA"
    return _alternatives([
        _byte_pattern(bytes([first])) + b"[" + _byte_pattern(bytes(by_first[first])) + b"]"
        for first in sorted(by_first, key=lambda letter: order.find(letter) if letter in order else len(order))
    ])


def _stepped_tag_pattern() -> bytes:
    """A little endian tag the header walks step over: group 0001 to (0028,0011), no header tag."""
    last_group, last_element = _LAST_HEADER_TAG >> 16, _LAST_HEADER_TAG & 0xFFFF
    assert last_group < 0x100 and last_element < 0x100  # one byte each: the byte classes below
    header_elements: dict[int, list[int]] = {}
    for tag in sorted(_HEADER_TAG_SET):
        header_elements.setdefault(tag >> 16, []).append(tag & 0xFFFF)
    plain_groups = bytes(group for group in range(1, last_group) if group not in header_elements)
    patterns = [b"[" + _byte_pattern(plain_groups) + b"]\\x00.."]
    for group in range(1, last_group + 1):
        if group not in header_elements and group != last_group:
            continue
        header = _alternatives([_byte_pattern(e.to_bytes(2, "little")) for e in header_elements[group]])
        elements = b"[\\x00-" + _byte_pattern(bytes([last_element])) + b"]\\x00" if group == last_group else b".."
        patterns.append(_byte_pattern(group.to_bytes(2, "little")) + b"(?!" + header + b")" + elements)
    return _alternatives(patterns)


def _run(element: bytes) -> re.Pattern[bytes]:
    """Zero or more elements, possessive (a run never gives an element back: nothing follows it)."""
    return re.compile(b"(?:" + element + b")*+", re.DOTALL)


_SHORT_LENGTH_AND_VALUE = _length_and_value_pattern(2)
_LONG_LENGTH_AND_VALUE = _length_and_value_pattern(4)
# what ``_fast_explicit_header`` and ``_fast_implicit_header`` step over without a look
_EXPLICIT_HEADER_RUN = _run(_stepped_tag_pattern() + _vr_pattern(_SHORT_VR) + _SHORT_LENGTH_AND_VALUE)
_IMPLICIT_HEADER_RUN = _run(_stepped_tag_pattern() + _LONG_LENGTH_AND_VALUE)
# what ``_rest_complete`` steps over: any tag (there the VR alone says how long the header is)
_EXPLICIT_RUN = _run(b"...." + _vr_pattern(_SHORT_VR - VR_LONG) + _SHORT_LENGTH_AND_VALUE)
_IMPLICIT_RUN = _run(b"...." + _LONG_LENGTH_AND_VALUE)


def _meta_element(element: int, vr: bytes, required: bool = False) -> bytes:
    """A File Meta element of this VR (capturing its length and value if required)."""
    tag = _byte_pattern(_TAG_LE.pack(0x0002, element)) + _byte_pattern(vr)
    if vr in _LONG_VR:
        return b"(?:" + tag + b".." + _LONG_LENGTH_AND_VALUE + b")?"
    return tag + b"(" + _SHORT_LENGTH_AND_VALUE + b")" if required else b"(?:" + tag + _SHORT_LENGTH_AND_VALUE + b")?"


# The File Meta elements (after the group length) as pydicom and pynetdicom write them, each
# optional but the Transfer Syntax UID (group 1): an order and VRs ``_walk_meta`` accepts.
_STANDARD_META = re.compile(
    _meta_element(0x0001, b"OB")
    + _meta_element(0x0002, b"UI")
    + _meta_element(0x0003, b"UI")
    + _meta_element(0x0010, b"UI", required=True)
    + _meta_element(0x0012, b"UI")
    + _meta_element(0x0013, b"SH")
    + _meta_element(0x0016, b"AE"),
    re.DOTALL,
)
_LITTLE_ENDIAN_SYNTAXES = frozenset({IMPLICIT, "1.2.840.10008.1.2.1"})


def _fast_explicit_header(data: bytes, pos: int) -> tuple[dict[int, _Found], int | None]:
    """The header elements of an explicit VR little endian data set before its first top-level
    tag above ``_LAST_HEADER_TAG``, and that tag's offset (None when the data set ends first)."""
    found: dict[int, _Found] = {}
    step_over = _EXPLICIT_HEADER_RUN.match
    unpack = _EXPLICIT_ELEMENT.unpack_from
    long_length = _U32_LE.unpack_from
    short_vr, long_vr, wanted = _SHORT_VR, _LONG_VR, _HEADER_TAG_SET
    try:
        while True:
            after = step_over(data, pos).end()  # type: ignore[union-attr]  # a run may be empty: it always matches
            if after < pos:
                raise _Unsure  # past the end (the pattern matches there as at the end): struct's error
            pos = after
            group, element, vr, length = unpack(data, pos)
            tag = group << 16 | element
            if tag > _LAST_HEADER_TAG:
                if group == 0xFFFE:
                    raise _Unsure
                return found, pos
            if vr in short_vr:
                if tag in wanted:
                    found[tag] = (vr, pos + 8, length)
                elif not group:
                    raise _Unsure  # a command group element: pydicom reads it otherwise
                pos += 8 + length
            elif vr in long_vr:
                if not group:
                    raise _Unsure
                length = long_length(data, pos + 8)[0]
                if length == UNDEFINED_LENGTH:
                    if tag in wanted or vr != b"SQ":
                        raise _Unsure
                    pos = _fast_sequence(data, pos + 12, False, 0)
                    continue
                if tag in wanted:
                    found[tag] = (vr, pos + 12, length)
                pos += 12 + length
            else:
                raise _Unsure  # a VR pydicom does not know: it would guess the encoding
    except struct.error:
        if pos != len(data):
            raise _Unsure from None
    return found, None


def _fast_implicit_header(data: bytes, pos: int) -> tuple[dict[int, _Found], int | None]:
    """``_fast_explicit_header`` for an implicit VR little endian data set."""
    found: dict[int, _Found] = {}
    step_over = _IMPLICIT_HEADER_RUN.match
    unpack = _IMPLICIT_ELEMENT.unpack_from
    wanted = _HEADER_TAG_SET
    try:
        while True:
            after = step_over(data, pos).end()  # type: ignore[union-attr]
            if after < pos:
                raise _Unsure
            pos = after
            group, element, length = unpack(data, pos)
            tag = group << 16 | element
            if tag > _LAST_HEADER_TAG:
                if group == 0xFFFE:
                    raise _Unsure
                return found, pos
            if length == UNDEFINED_LENGTH:
                if tag in wanted or not group or not _is_sequence(tag, None):
                    raise _Unsure
                pos = _fast_sequence(data, pos + 8, True, 0)
                continue
            if tag in wanted:
                found[tag] = (None, pos + 8, length)
            elif not group:
                raise _Unsure
            pos += 8 + length
    except struct.error:
        if pos != len(data):
            raise _Unsure from None
    return found, None


def _rest_complete(data: bytes, pos: int, implicit: bool) -> bool:
    """Whether ``_walk_elements`` from the top-level element at ``pos`` finds the data set
    complete and followable (as the reference path needs it to be), walking as it does."""
    end = len(data)
    try:
        if implicit:
            step_over = _IMPLICIT_RUN.match
            unpack_length = _IMPLICIT_LENGTH.unpack_from
            while True:
                after = step_over(data, pos).end()  # type: ignore[union-attr]
                if after < pos:
                    return False  # past the end: struct's error, and not at the end
                if after == end:
                    return True  # struct's error at the end, which costs more than this test
                pos = after
                (length,) = unpack_length(data, pos)
                if length == UNDEFINED_LENGTH:
                    after = skip_sequence(data, pos + 8, _LE_IMPLICIT, 0)
                    if after is None:
                        return False
                    pos = after
                else:
                    pos += 8 + length
        step_over = _EXPLICIT_RUN.match
        unpack = _VR_LENGTH.unpack_from
        long_length = _U32_LE.unpack_from
        long_vr = VR_LONG  # the reference walk's test (a VR it does not know has a short header there)
        while True:
            after = step_over(data, pos).end()  # type: ignore[union-attr]
            if after < pos:
                return False
            if after == end:
                return True
            pos = after
            vr, length = unpack(data, pos)
            if vr in long_vr:
                length = long_length(data, pos + 8)[0]
                if length == UNDEFINED_LENGTH:
                    after = skip_sequence(data, pos + 12, _LE_EXPLICIT, 0)
                    if after is None:
                        return False
                    pos = after
                else:
                    pos += 12 + length
            else:
                pos += 8 + length
    except struct.error:
        return pos == end


def _fast_sequence(data: bytes, pos: int, implicit: bool, depth: int) -> int:
    """Offset after an undefined-length sequence whose first item starts at ``pos``."""
    if depth > MAX_NESTING:
        raise _Unsure
    while True:
        if pos + 8 > len(data):
            raise _Unsure
        group, element = _TAG_LE.unpack_from(data, pos)
        tag, length = group << 16 | element, _U32_LE.unpack_from(data, pos + 4)[0]
        pos += 8
        if tag == SEQUENCE_END and length == 0:
            return pos
        if tag != ITEM:
            raise _Unsure
        if length == UNDEFINED_LENGTH:
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
        if length == UNDEFINED_LENGTH:
            if not _is_sequence(tag, vr):
                raise _Unsure
            pos = _fast_sequence(data, value_pos, implicit, depth)
        else:
            pos = value_pos + length
            if pos > (len(data) if item_end is None else item_end):
                raise _Unsure


# --------------------------------------------------------------------------- fast values
#
# pydicom's reader keeps the header elements raw and converts each on first access
# (``Dataset.__getitem__``: VR from the file or the dictionary, ``convert_value``, a
# ``DataElement``, ``Dataset.__setitem__``), some 15 microseconds an element. For the
# plain values a header mostly has, ``_header_dataset`` gives the very value that
# conversion gives, without the warnings it would raise since it takes none that
# pydicom's validation would object to; every other element stays a RawDataElement in
# the data set and pydicom converts it as before.


class _Spec(NamedTuple):
    tag: BaseTag
    keyword: str
    vr: str  # the dictionary VR: what pydicom uses for implicit VR
    raw_vr: bytes  # the explicit VR that matches it


# in HEADER_TAGS order, the order the reference path converts them in
_SPECS: MappingProxyType[int, _Spec] = MappingProxyType({
    int(tag): _Spec(BaseTag(tag), keyword, dictionary_VR(tag), dictionary_VR(tag).encode("ascii"))
    for keyword in HEADER_TAGS
    for tag in (tag_for_keyword(keyword),)
    if tag is not None
})
# pydicom's UI validation (valuerep) without the leniency of ``re.match(...$)``; possessive,
# since a component ends where a dot is, which no digit matches: nothing to backtrack to
_UI_VALUE = re.compile(rb"(?:[1-9][0-9]*+|0)(?:\.(?:[1-9][0-9]*+|0))*+")
# a single text value that every ASCII-compatible codec decodes alike: printable ASCII,
# no backslash (value delimiter), NUL padding at most
_ASCII_TEXT = re.compile(rb"[\x20-\x5B\x5D-\x7E]*\x00*")
_IS_VALUE = re.compile(rb"[0-9]{1,12}")
_LO_MAX = 64


def _ascii_charsets() -> frozenset[str]:
    """The Specific Character Set values whose codec decodes printable ASCII as ASCII (no ISO
    2022 code extensions, no Shift JIS whose 0x5C some codecs read as a yen sign), of those
    this pydicom knows: for another one it warns on every text value, and falls back."""
    terms = ("", "ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126",
             "ISO_IR 127", "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 166", "ISO_IR 192", "GB18030", "GBK")
    ascii_bytes = bytes(range(0x20, 0x7F))
    known = set()
    for term in terms:
        try:
            if ascii_bytes.decode(python_encoding[term]) == ascii_bytes.decode("ascii"):
                known.add(term)
        except (KeyError, LookupError):
            continue
    return frozenset(known)


_ASCII_CHARSETS = _ascii_charsets()


class _NotPlain:
    """Marks a value ``_header_dataset`` leaves to pydicom."""


_NOT_PLAIN = _NotPlain()


def _pydicom_converts_plainly() -> bool:
    """Whether pydicom's element conversion is its default one (an application may
    register hooks or callbacks, which the fast values would bypass)."""
    return (
        pydicom_config.data_element_callback is None
        and pydicom_hooks.hooks.raw_element_vr is pydicom_hooks.raw_element_vr
        and pydicom_hooks.hooks.raw_element_value is pydicom_hooks.raw_element_value
        and not pydicom_hooks.hooks.raw_element_kwargs
        and not pydicom_config.use_IS_numpy
    )


def _header_dataset(
    data: bytes, found: dict[int, _Found], implicit: bool
) -> tuple[Dataset, dict[str, Any], dict[str, str]]:
    """The header data set as pydicom's ``read_dataset`` builds it from these elements, its
    values checked, the values by keyword (absent elements absent), and the UIDs decoded
    here as ``valid_uid`` gives them (plain ``str``), by keyword.

    A value is plain, and decoded here, when it needs no character set beyond ASCII and
    pydicom's validation would not object to it; then it is the very value pydicom's
    conversion gives (the comments name the converters of ``pydicom.values``).
    """
    plain = _pydicom_converts_plainly()
    validation_mode = pydicom_config.settings.reading_validation_mode
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    values: dict[str, Any] = {}
    uids: dict[str, str] = {}
    encoding: str | list[str] = default_encoding
    ascii_text = True  # whether the character set decodes printable ASCII as ASCII
    charset = found.get(_CHARSET_TAG)
    if charset is not None:  # first: the text values depend on it
        spec = _SPECS[_CHARSET_TAG]
        raw_vr, value_pos, length = charset
        raw = data[value_pos : value_pos + length]
        if plain and raw_vr in (None, b"CS") and b"\\" not in raw:  # convert_string, one value
            value = raw.decode("latin-1").rstrip(" \x00") if length else empty_value_for_VR("CS")
            elements[spec.tag] = _plain_element(spec.tag, "CS", value, value_pos, validation_mode)
            values[spec.keyword] = value
        else:  # as pydicom's reader: its element generator decodes it first, whatever the VR
            convert_encodings(convert_string(raw, True))
            elements[spec.tag] = _raw_element(spec.tag, raw_vr, raw, value_pos, implicit)
            value = convert_raw_data_element(elements[spec.tag]).value  # type: ignore[arg-type]
        encoding = convert_encodings(value)
        ascii_text = type(value) is str and value in _ASCII_CHARSETS
    for tag, (raw_vr, value_pos, length) in found.items():
        if tag == _CHARSET_TAG:
            continue
        spec = _SPECS[tag]
        vr = spec.vr
        raw = data[value_pos : value_pos + length]
        value: Any = _NOT_PLAIN
        if not plain or (raw_vr is not None and raw_vr != spec.raw_vr) or vr == "SQ":
            pass  # pydicom's VR lookup, hooks or sequence parsing decide
        elif not length:
            value = empty_value_for_VR(vr)  # convert_value: the same for every VR
        elif vr == "UI":  # convert_UI: latin-1, padding stripped; UID() validates and strips
            text = raw.rstrip(b"\x00 ")
            if len(text) <= 64 and _UI_VALUE.fullmatch(text):
                # valid_uid's text: no padding, digits and single dots, 64 characters at most
                uids[spec.keyword] = uid = text.decode("ascii")
                value = str.__new__(UID, uid)  # UID() less the validation just done
        elif vr == "CS":  # convert_string: latin-1, padding stripped, no validation
            if b"\\" not in raw:
                value = raw.decode("latin-1").rstrip(" \x00")
        elif vr == "LO":  # convert_text: per the character set, validated, padding stripped
            if ascii_text and len(raw) <= _LO_MAX and _ASCII_TEXT.fullmatch(raw):
                value = raw.decode("ascii").rstrip("\x00 ")
        elif vr == "US":  # convert_numbers: a single little endian value is an int
            if length == 2:
                value = raw[0] | raw[1] << 8
        elif vr == "IS":  # convert_IS_string: latin-1, padding stripped, IS()
            text = raw.rstrip(b" \x00")
            if _IS_VALUE.fullmatch(text):
                value = IS(text.decode("ascii"))
        if value is _NOT_PLAIN:
            elements[spec.tag] = _raw_element(spec.tag, raw_vr, raw, value_pos, implicit)
        else:
            elements[spec.tag] = _plain_element(spec.tag, vr, value, value_pos, validation_mode)
            values[spec.keyword] = value
    ds = _new_dataset(elements, implicit, encoding)
    if len(values) < len(elements):  # else every element has its value (each value is an element's)
        # as _read_header: pydicom converts the others now, so that a malformed one fails now
        for spec in _SPECS.values():
            if spec.keyword not in values and spec.tag in elements:
                values[spec.keyword] = ds.get(spec.keyword)
    return ds, values, uids


def _raw_element(tag: BaseTag, raw_vr: bytes | None, raw: bytes, value_pos: int, implicit: bool) -> RawDataElement:
    """The RawDataElement pydicom's reader makes of a little endian element of defined length."""
    vr = None if raw_vr is None else raw_vr.decode("ascii")
    return RawDataElement(tag, vr, len(raw), raw if raw else empty_value_for_VR(vr, raw=True), value_pos, implicit, True)


# the instance attributes of a DataElement that ``_plain_element`` sets, in its ``__init__``'s order
_ELEMENT_ATTRIBUTES = ("tag", "VR", "validation_mode", "_value", "file_tell", "is_undefined_length", "private_creator")
_ELEMENT_BY_STATE: bool = (
    tuple(vars(DataElement(BaseTag(0x00100020), "LO", "", 0, False, already_converted=True))) == _ELEMENT_ATTRIBUTES
    and DataElement.__setattr__ is object.__setattr__
    and not any(hasattr(DataElement, name) for name in _ELEMENT_ATTRIBUTES)  # plain attributes, no descriptors
)


def _plain_element(tag: BaseTag, vr: str, value: Any, value_pos: int, validation_mode: int) -> DataElement:
    """``DataElement(tag, vr, value, value_pos, already_converted=True)`` as ``convert_raw_data_element``
    makes it; its ``__init__`` costs twice as much as setting the attributes it sets. Set one by
    one in its order, as ``__init__`` does, they share the class's key table (a dict built
    and assigned to ``__dict__`` costs more)."""
    if not _ELEMENT_BY_STATE:  # another pydicom version: its own constructor
        return DataElement(tag, vr, value, value_pos, False, already_converted=True, validation_mode=validation_mode)
    element = object.__new__(DataElement)
    element.tag = tag
    element.VR = vr
    element.validation_mode = validation_mode
    element._value = value
    element.file_tell = value_pos
    element.is_undefined_length = False
    element.private_creator = None
    return element


def _dataset_state() -> tuple[tuple[tuple[str, Any], ...], tuple[tuple[str, tuple[Any, ...]], ...]] | None:
    """The instance attributes ``Dataset()`` sets, less ``_dict``: (scalars, dicts as item tuples);
    None when one is of a kind ``_new_dataset`` could not copy faithfully."""
    scalar = (str, bool, int, type(None))
    scalars: list[tuple[str, Any]] = []
    dicts: list[tuple[str, tuple[Any, ...]]] = []
    for name, value in vars(Dataset()).items():
        if name == "_dict":
            continue
        if isinstance(value, dict) and all(isinstance(item, scalar) for item in value.values()):
            dicts.append((name, tuple(value.items())))
        elif isinstance(value, scalar):
            scalars.append((name, value))
        else:
            return None
    return tuple(scalars), tuple(dicts)


def _encoding_attributes() -> tuple[str, str, str] | None:
    """The attributes ``Dataset.set_original_encoding(implicit, little, charset)`` sets, in that
    order, when it sets just these; else None."""
    probe = Dataset()
    before = dict(vars(probe))
    probe.set_original_encoding(True, False, "probe")
    changed = {name: value for name, value in vars(probe).items() if before.get(name, before) != value}
    expected = {"_read_implicit": True, "_read_little": False, "_read_charset": "probe"}
    return ("_read_implicit", "_read_little", "_read_charset") if changed == expected else None


_DATASET_STATE = _dataset_state()
_ENCODING_ATTRIBUTES = _encoding_attributes()
_KEYWORD_TAGS: MappingProxyType[str, BaseTag] = MappingProxyType({spec.keyword: spec.tag for spec in _SPECS.values()})


class _HeaderDataset(Dataset):
    """The fast path's header data set: a Dataset whose ``get`` and ``in`` of a header keyword
    (what ``classify`` asks, a dozen times an object) look in its elements directly, where
    ``Dataset`` goes through ``__getattr__``, the keyword dictionary and ``Tag`` (microseconds
    each); anything else, and an element pydicom has yet to convert, is left to Dataset."""

    def get(self, key: Any, default: Any | None = None) -> Any:
        if type(key) is str:
            tag = _KEYWORD_TAGS.get(key)
            if tag is not None:
                element = self._dict.get(tag)
                if element is None:
                    return default
                if type(element) is DataElement:
                    return element.value
        return super().get(key, default)

    def __contains__(self, name: Any) -> bool:
        if type(name) is str:
            tag = _KEYWORD_TAGS.get(name)
            if tag is not None:
                return tag in self._dict
        return super().__contains__(name)


def _new_dataset(
    elements: dict[BaseTag, DataElement | RawDataElement], implicit: bool, encoding: str | list[str]
) -> Dataset:
    """``Dataset(elements)`` with ``set_original_encoding(implicit, True, encoding)``: its
    ``__init__`` sets a dozen attributes through ``Dataset.__setattr__``, which costs more than
    the rest of the fast path's data set; this sets the same ones directly."""
    if _DATASET_STATE is None or _ENCODING_ATTRIBUTES is None:  # another pydicom: its own way
        ds = _HeaderDataset(elements)
        ds.set_original_encoding(implicit, True, encoding)
        return ds
    ds = _HeaderDataset.__new__(_HeaderDataset)
    state = ds.__dict__
    scalars, dicts = _DATASET_STATE
    state.update(scalars)
    for name, items in dicts:
        state[name] = dict(items)
    state["_dict"] = elements
    read_implicit, read_little, read_charset = _ENCODING_ATTRIBUTES
    state[read_implicit] = implicit
    state[read_little] = True
    state[read_charset] = encoding
    return ds
