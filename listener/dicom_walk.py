"""Walking the element headers of an encoded DICOM data set, values skipped and never decoded.

Pure ``struct`` code over the file's bytes, shared by the listener's header checks
(``listener.header``) and the decoding processes' reads (``listener.spool_decode``), which
need it without pydicom's parse of every element. Anything that cannot be followed with
certainty (truncated, malformed, nested too deep) gives ``None``: the caller then leaves the
file to pydicom, whose errors name the problem.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

VR_LONG = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT = "1.2.840.10008.1.2"
BIG_ENDIAN = "1.2.840.10008.1.2.2"


def data_set_start(data: bytes) -> int | None:
    """Offset of the data set after a File Meta group with its standard group length, else None."""
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00" or data[136:138] != b"UL":
        return None
    return 144 + int.from_bytes(data[140:144], "little")


def meta_transfer_syntax(data: bytes) -> str | None:
    """The Transfer Syntax UID of the File Meta group (always explicit VR little endian), or None."""
    start = data_set_start(data)
    if start is None:
        return None
    pos, end = 144, min(start, len(data))
    while pos + 8 <= end:
        group, element, vr = struct.unpack_from("<HH2s", data, pos)
        if vr in VR_LONG:
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
class Encoding:
    implicit: bool
    tag: str  # struct format of (group, element)
    short: str  # 2-byte length
    long: str  # 4-byte length


MAX_NESTING = 16  # sequences nested deeper than this are left to pydicom (hostile input)
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def element_header(data: bytes, pos: int, enc: Encoding) -> tuple[int, int, int] | None:
    """(tag, header size, value length) of the element at ``pos``; None when its header does not fit."""
    if pos + 8 > len(data):
        return None
    group, element = struct.unpack_from(enc.tag, data, pos)
    if enc.implicit or group == 0xFFFE:  # items and delimiters have no VR in either encoding
        return group << 16 | element, 8, struct.unpack_from(enc.long, data, pos + 4)[0]
    if data[pos + 4 : pos + 6] in VR_LONG:
        if pos + 12 > len(data):
            return None
        return group << 16 | element, 12, struct.unpack_from(enc.long, data, pos + 8)[0]
    return group << 16 | element, 8, struct.unpack_from(enc.short, data, pos + 6)[0]


def skip_sequence(data: bytes, pos: int, enc: Encoding, depth: int) -> int | None:
    """Offset just after an undefined-length sequence (or encapsulated pixel data) whose first
    item starts at ``pos``; None when it cannot be followed with certainty."""
    if depth > MAX_NESTING:
        return None
    while pos + 8 <= len(data):
        group, element = struct.unpack_from(enc.tag, data, pos)
        tag, length = group << 16 | element, struct.unpack_from(enc.long, data, pos + 4)[0]
        pos += 8
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            return None
        if length != UNDEFINED_LENGTH:
            pos += length
            continue
        item_end = skip_item(data, pos, enc, depth + 1)
        if item_end is None:
            return None
        pos = item_end
    return None


def skip_item(data: bytes, pos: int, enc: Encoding, depth: int) -> int | None:
    """Offset just after the Item Delimitation of an undefined-length item whose elements start at ``pos``."""
    while True:
        header = element_header(data, pos, enc)
        if header is None:
            return None
        tag, size, length = header
        if tag == ITEM_END:
            return pos + 8
        if length == UNDEFINED_LENGTH:
            after = skip_sequence(data, pos + size, enc, depth)
            if after is None:
                return None
            pos = after
        else:
            pos += size + length
        if pos > len(data):
            return None


def encoding_for(transfer_syntax: str) -> Encoding:
    """How the data set of ``transfer_syntax`` is encoded (not for deflated data sets)."""
    big = transfer_syntax == BIG_ENDIAN
    return Encoding(
        implicit=transfer_syntax == IMPLICIT,
        tag=">HH" if big else "<HH",
        short=">H" if big else "<H",
        long=">L" if big else "<L",
    )


def top_level_elements(data: bytes) -> tuple[int, Encoding, list[tuple[int, int, int]]] | None:
    """(offset of the data set after the File Meta group, encoding, [(tag, start, end)]) of a
    file's top-level data set elements, ``start`` at the element's header and ``end`` just
    after its value, from one pass.

    None when the file has no File Meta group with its standard group length or no Transfer
    Syntax UID, is deflated, or holds an element or sequence that cannot be followed with
    certainty: then a full parser must read it.
    """
    start = data_set_start(data)
    transfer_syntax = meta_transfer_syntax(data)
    if start is None or transfer_syntax is None or transfer_syntax == DEFLATED or start > len(data):
        return None
    enc = encoding_for(transfer_syntax)
    elements: list[tuple[int, int, int]] = []
    pos, end = start, len(data)
    while pos < end:
        header = element_header(data, pos, enc)
        if header is None:
            return None
        tag, size, length = header
        if length == UNDEFINED_LENGTH:
            after = skip_sequence(data, pos + size, enc, 0)
            if after is None:
                return None
        else:
            after = pos + size + length
            if after > end:
                return None
        elements.append((tag, pos, after))
        pos = after
    return start, enc, elements
