"""The fast path's shortcuts give exactly what the code they shortcut gave.

``_fast_explicit_header``, ``_fast_implicit_header`` and ``_rest_complete`` step over runs of
plain elements with one pattern match where they took a loop iteration an element. The
loops they were are kept here as the specification: over pydicom's test files, random
element sequences (header tags in and out of order, every VR kind, short, long, odd and
undefined lengths, sequences, command and item tags, tags either side of (0028,0011)),
truncations and damage, the walks give the same elements in the same order, the same
offsets, the same refusals. Likewise ``_fast_meta``, which takes the File Meta layout
pydicom and pynetdicom write with one pattern and walks any other (the walk it was is
kept here too). Also: the patterns' tag test against its definition, the possessive UID
pattern against the backtracking one, the UIDs the fast path hands ``_checked_header`` as
valid, and the ``DataElement`` it makes without its ``__init__``.
"""

from __future__ import annotations

import random
import re
import struct
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.config import settings
from pydicom.dataelem import DataElement
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from listener.dicom_walk import UNDEFINED_LENGTH as _UNDEFINED
from listener.dicom_walk import VR_LONG as _VR_LONG
from listener.dicom_walk import skip_sequence as _skip_sequence
from listener.header import (
    _ELEMENT_BY_STATE,
    _EXPLICIT_ELEMENT,
    _EXPLICIT_HEADER_RUN,
    _EXPLICIT_RUN,
    _HEADER_TAG_SET,
    _IMPLICIT_ELEMENT,
    _IMPLICIT_HEADER_RUN,
    _IMPLICIT_LENGTH,
    _IMPLICIT_RUN,
    _LAST_HEADER_TAG,
    _LE_EXPLICIT,
    _LE_IMPLICIT,
    _LITTLE_ENDIAN_SYNTAXES,
    _LONG_VR,
    _SHORT_VR,
    _STANDARD_META,
    _U32_LE,
    _UI_VALUE,
    _VR_LENGTH,
    InvalidObjectError,
    _fast_elements,
    _fast_explicit_header,
    _fast_implicit_header,
    _fast_meta,
    _fast_sequence,
    _Found,
    _header_dataset,
    _is_sequence,
    _is_uid_text,
    _plain_element,
    _rest_complete,
    _stepped_tag_pattern,
    _Unsure,
    file_meta_bytes,
    parse_header,
    parse_header_reference,
    valid_uid,
)
from tests.listener.test_fast_header import _check, _encodings, _test_files

# --------------------------------------------------------------------------- the loops, as they were


def _loop_explicit_header(data: bytes, pos: int) -> tuple[dict[int, _Found], int | None]:
    found: dict[int, _Found] = {}
    try:
        while True:
            group, element, vr, length = _EXPLICIT_ELEMENT.unpack_from(data, pos)
            tag = group << 16 | element
            if tag > _LAST_HEADER_TAG:
                if group == 0xFFFE:
                    raise _Unsure
                return found, pos
            if vr in _SHORT_VR:
                if tag in _HEADER_TAG_SET:
                    found[tag] = (vr, pos + 8, length)
                elif not group:
                    raise _Unsure
                pos += 8 + length
            elif vr in _LONG_VR:
                if not group:
                    raise _Unsure
                length = _U32_LE.unpack_from(data, pos + 8)[0]
                if length == _UNDEFINED:
                    if tag in _HEADER_TAG_SET or vr != b"SQ":
                        raise _Unsure
                    pos = _fast_sequence(data, pos + 12, False, 0)
                    continue
                if tag in _HEADER_TAG_SET:
                    found[tag] = (vr, pos + 12, length)
                pos += 12 + length
            else:
                raise _Unsure
    except struct.error:
        if pos != len(data):
            raise _Unsure from None
    return found, None


def _loop_implicit_header(data: bytes, pos: int) -> tuple[dict[int, _Found], int | None]:
    found: dict[int, _Found] = {}
    try:
        while True:
            group, element, length = _IMPLICIT_ELEMENT.unpack_from(data, pos)
            tag = group << 16 | element
            if tag > _LAST_HEADER_TAG:
                if group == 0xFFFE:
                    raise _Unsure
                return found, pos
            if length == _UNDEFINED:
                if tag in _HEADER_TAG_SET or not group or not _is_sequence(tag, None):
                    raise _Unsure
                pos = _fast_sequence(data, pos + 8, True, 0)
                continue
            if tag in _HEADER_TAG_SET:
                found[tag] = (None, pos + 8, length)
            elif not group:
                raise _Unsure
            pos += 8 + length
    except struct.error:
        if pos != len(data):
            raise _Unsure from None
    return found, None


def _loop_rest_complete(data: bytes, pos: int, implicit: bool) -> bool:
    try:
        if implicit:
            while True:
                (length,) = _IMPLICIT_LENGTH.unpack_from(data, pos)
                if length == _UNDEFINED:
                    after = _skip_sequence(data, pos + 8, _LE_IMPLICIT, 0)
                    if after is None:
                        return False
                    pos = after
                else:
                    pos += 8 + length
        while True:
            vr, length = _VR_LENGTH.unpack_from(data, pos)
            if vr in _VR_LONG:
                length = _U32_LE.unpack_from(data, pos + 8)[0]
                if length == _UNDEFINED:
                    after = _skip_sequence(data, pos + 12, _LE_EXPLICIT, 0)
                    if after is None:
                        return False
                    pos = after
                else:
                    pos += 12 + length
            else:
                pos += 8 + length
    except struct.error:
        return pos == len(data)


def _outcome(walk: Callable[..., object], *args: object) -> object:
    """The result with the found elements' order, or that the walk refused."""
    try:
        result = walk(*args)
    except _Unsure:
        return "unsure"
    if isinstance(result, tuple):
        found, cut = result
        return list(found.items()), cut
    return result


def _check_walks(data: bytes, pos: int) -> None:
    """The runs' walks equal the loops from ``pos``, both as a header and (from there) as the rest."""
    assert _outcome(_fast_explicit_header, data, pos) == _outcome(_loop_explicit_header, data, pos)
    assert _outcome(_fast_implicit_header, data, pos) == _outcome(_loop_implicit_header, data, pos)
    for implicit in (False, True):
        assert _rest_complete(data, pos, implicit) == _loop_rest_complete(data, pos, implicit)


# --------------------------------------------------------------------------- random data sets

_SEQUENCE_TAGS = (0x00081115, 0x00101002, 0x00082112)  # SQ in the dictionary, before (0028,0011)
# tags the walks refuse or end on wherever they are: rarer, so that most data sets get walked
_ODD_TAGS = (0x00000000, 0x00000010, 0x00000900, 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD)
_TAG_POOL = (
    *sorted(_HEADER_TAG_SET), *_SEQUENCE_TAGS,
    0x00010000, 0x00010010, 0x00020010, 0x00040000, 0x00080000, 0x00080004, 0x00080006, 0x00080017,
    0x00080020, 0x0008005F, 0x00080061, 0x00081030, 0x0008FFFF,
    0x00090010, 0x00091001, 0x00100010, 0x00100021, 0x0010FFFF, 0x00190010, 0x00191001, 0x0020000C,
    0x0020000F, 0x00200013, 0x00270001, 0x0027FFFF, 0x00280000, 0x00280002, 0x00280007, 0x00280009,
    0x0028000F, 0x00280012, 0x00280030, 0x00280100, 0x00280111, 0x00281011, 0x00281052, 0x00290010,
    0x00430010, 0x01080005, 0x08000008, 0x28000011, 0x7FE00010, 0xFFFCFFFC,
)
_VRS = (*(vr.decode() for vr in sorted(_SHORT_VR)), *(vr.decode() for vr in sorted(_LONG_VR)))
_ODD_VRS = ("XX", "cs", "\x00\x00", "O\x00")


def _random_tag(rng: random.Random) -> int:
    if rng.random() < 0.02:
        return rng.choice(_ODD_TAGS)
    if rng.random() < 0.75:
        return rng.choice(_TAG_POOL)
    return rng.randrange(0, 0x2A) << 16 | rng.choice((rng.randrange(0x20), rng.randrange(0x10000)))


def _item(rng: random.Random, implicit: bool, depth: int) -> bytes:
    """An item of a sequence: of defined or undefined length, sometimes malformed."""
    body = b"".join(_random_element(rng, implicit, depth + 1) for _ in range(rng.randrange(3)))
    if rng.random() < 0.5:
        return struct.pack("<HHL", 0xFFFE, 0xE000, max(0, len(body) + rng.choice((0, 0, 0, 0, 2, -2)))) + body
    end = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) if rng.random() < 0.95 else b""
    return struct.pack("<HHL", 0xFFFE, 0xE000, _UNDEFINED) + body + end


def _random_element(rng: random.Random, implicit: bool, depth: int = 0) -> bytes:
    tag = _random_tag(rng)
    group, element = tag >> 16, tag & 0xFFFF
    length = rng.choice((0, 2, 4, 8, 10, 26, 64, rng.randrange(70), rng.randrange(70), rng.randrange(300)))
    value = bytes(rng.randrange(256) for _ in range(length))
    undefined = depth < 3 and rng.random() < 0.1
    if undefined:  # a sequence (or not) of undefined length
        value = b"".join(_item(rng, implicit, depth) for _ in range(rng.randrange(3)))
        if rng.random() < 0.95:
            value += struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    if implicit:
        tag = rng.choice(_SEQUENCE_TAGS) if undefined and rng.random() < 0.7 else tag
        return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, _UNDEFINED if undefined else len(value)) + value
    vr = "SQ" if undefined and rng.random() < 0.7 else rng.choice(_ODD_VRS if rng.random() < 0.02 else _VRS)
    if vr.encode("latin-1") in _VR_LONG or undefined:
        reserved = b"\x00\x00" if rng.random() < 0.9 else b"\x01\x02"
        size = _UNDEFINED if undefined else len(value)
        return struct.pack("<HH2s", group, element, vr.encode("latin-1")) + reserved + struct.pack("<L", size) + value
    return struct.pack("<HH2sH", group, element, vr.encode("latin-1"), len(value) & 0xFFFF) + value


def _random_data_set(rng: random.Random, implicit: bool) -> bytes:
    elements = [_random_element(rng, implicit) for _ in range(rng.randrange(1, 40))]
    if rng.random() < 0.7:  # mostly in ascending tag order, as data sets are
        elements.sort(key=lambda element: struct.unpack_from("<HH", element))
    data = b"".join(elements)
    if rng.random() < 0.3:
        data = data[: rng.randrange(len(data) + 1)]
    return data


@pytest.mark.parametrize("seed", range(4))
def test_random_data_sets_walk_as_the_loops_did(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(1500):
        implicit = rng.random() < 0.5
        data = _random_data_set(rng, implicit)
        _check_walks(data, 0)
        if data:
            _check_walks(data, rng.randrange(len(data)))


def _plain_header(implicit: bool, rng: random.Random) -> list[bytes]:
    """The elements of header tags between plain ones, in order, their values of lengths the
    runs take or just not."""
    tags = sorted({*_HEADER_TAG_SET, *(rng.choice(_TAG_POOL) for _ in range(30))})
    out = []
    for tag in tags:
        if tag >> 16 in (0, 0xFFFE):
            continue
        value = b"7" * rng.choice((0, 1, 2, 26, 63, 64, 65, 66))
        vr = b"LO" if rng.random() < 0.8 else rng.choice(sorted(_SHORT_VR))
        if implicit:
            out.append(struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value)
        else:
            out.append(struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value)
    return out


def test_header_elements_of_every_length_in_order_and_out_of_order() -> None:
    rng = random.Random(11)
    for _ in range(400):
        implicit = rng.random() < 0.5
        elements = _plain_header(implicit, rng)
        data = b"".join(elements)
        _check_walks(data, 0)
        rng.shuffle(elements)  # out of order: runs end sooner, the loop goes on
        _check_walks(b"".join(elements), 0)
        _check_walks(data + data, 0)  # every header tag twice: the later one wins, in the first one's place


def test_offsets_at_and_past_the_end() -> None:
    data = b"".join(_plain_header(False, random.Random(3)))
    for pos in (len(data), len(data) + 1, len(data) + 9, len(data) - 1, len(data) - 8):
        _check_walks(data, pos)
    assert _rest_complete(data, len(data) + 4, False) is False  # the patterns match at the end there
    assert _outcome(_fast_explicit_header, data, len(data) + 4) == "unsure"


# --------------------------------------------------------------------------- real files


def _data_set_start(data: bytes) -> int:
    return 144 + _U32_LE.unpack_from(data, 140)[0]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's, reading some test files
def test_test_files_walk_as_the_loops_did() -> None:
    rng = random.Random(5)
    walked = 0
    for path in _test_files():
        for data in _encodings(path):
            if data[128:132] != b"DICM":
                continue
            start = _data_set_start(data)
            _check_walks(data, start)
            for _ in range(3):
                damaged = bytearray(data)
                for _ in range(rng.randint(1, 4)):
                    damaged[rng.randrange(start, min(len(data), start + 4000))] = rng.randrange(256)
                _check_walks(bytes(damaged), start)
                _check_walks(data[: rng.randrange(start, len(data) + 1)], start)
            walked += 1
    assert walked >= 100


def _elements_between_runs(data: bytes, pos: int, implicit: bool) -> tuple[int, int]:
    """(elements the header walk's loop takes itself, elements in all) up to the first tag
    after (0028,0011) of a data set without sequences of undefined length."""
    run = _IMPLICIT_HEADER_RUN if implicit else _EXPLICIT_HEADER_RUN
    by_loop = in_all = 0
    while True:
        after = run.match(data, pos)
        assert after is not None
        while pos < after.end():  # count what the run stepped over
            length = _U32_LE.unpack_from(data, pos + 4)[0] if implicit else struct.unpack_from("<H", data, pos + 6)[0]
            pos += 8 + length
            in_all += 1
        assert pos == after.end()
        group, element = struct.unpack_from("<HH", data, pos)
        if (group << 16 | element) > _LAST_HEADER_TAG:
            return by_loop, in_all
        if implicit:
            pos += 8 + _U32_LE.unpack_from(data, pos + 4)[0]
        elif data[pos + 4 : pos + 6] in _LONG_VR:
            pos += 12 + _U32_LE.unpack_from(data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
        by_loop += 1
        in_all += 1


def test_the_runs_take_most_of_the_ct_header() -> None:
    """Without this the tests above could pass with runs that never take anything."""
    path = Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm"
    ds = pydicom.dcmread(path)
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        assert _fast_elements(data) is not None
        by_loop, in_all = _elements_between_runs(data, _data_set_start(data), syntax == ImplicitVRLittleEndian)
        # the loop: the ten header elements, a sequence, a value longer than the runs take
        assert in_all > 180 and by_loop <= 15, (syntax, by_loop, in_all)


# --------------------------------------------------------------------------- the patterns' parts


def test_stepped_tags_are_the_ones_the_loops_step_over() -> None:
    stepped = re.compile(_stepped_tag_pattern(), re.DOTALL)
    groups = [*range(0x2B), 0x0100, 0x0108, 0x0828, 0x2800, 0x7FE0, 0xFFFE]
    elements = [*range(0x240), *range(0x0FF0, 0x1120), *range(0xFFF0, 0x10000), 0x2800, 0x0828]
    for group in groups:
        for element in elements:
            tag = group << 16 | element
            expected = group != 0 and tag <= _LAST_HEADER_TAG and tag not in _HEADER_TAG_SET
            assert (stepped.fullmatch(struct.pack("<HH", group, element)) is not None) == expected, hex(tag)


def test_possessive_uid_pattern_equals_the_backtracking_one() -> None:
    backtracking = re.compile(rb"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")
    rng = random.Random(9)
    texts = [b"", b"0", b"00", b"0.0", b"01", b"1.01", b"1.0.1", b"1.", b".1", b"1..2", b"10.20.0", b"1.2.3\n"]
    texts += [bytes(rng.choice(b"0123456789...0\n a") for _ in range(rng.randrange(12))) for _ in range(20000)]
    for text in texts:
        assert (_UI_VALUE.fullmatch(text) is not None) == (backtracking.fullmatch(text) is not None), text


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's, about the invalid UIDs among the random ones
def test_uids_handed_over_as_valid_are_what_valid_uid_gives() -> None:
    rng = random.Random(13)
    alphabet = b"0123456789.. \x00a"
    uid_tags = {0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x0020000D: "StudyInstanceUID",
                0x0020000E: "SeriesInstanceUID"}
    checked = 0
    for _ in range(3000):
        tag = rng.choice(sorted(uid_tags))
        value = bytes(rng.choice(alphabet) for _ in range(rng.randrange(70)))
        data = struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, b"UI", len(value)) + value
        _, values, uids = _header_dataset(data, {tag: (b"UI", 8, len(value))}, False)
        keyword = uid_tags[tag]
        if keyword in uids:
            assert type(uids[keyword]) is str
            assert uids[keyword] == valid_uid(values[keyword])
            checked += 1
    assert checked > 100


# --------------------------------------------------------------------------- File Meta


def _loop_meta(data: bytes, start: int) -> str:
    """``_fast_meta`` as it was: the elements walked one by one."""
    pos, previous, transfer_syntax = 144, 0x00020000, None
    while pos < start:
        if pos + 8 > start:
            raise _Unsure
        group, element, vr, length = _EXPLICIT_ELEMENT.unpack_from(data, pos)
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
        if length == _UNDEFINED or pos + length > start:
            raise _Unsure
        if tag == 0x00020010:
            transfer_syntax = data[pos : pos + length].decode("latin-1").rstrip("\x00 ")
        pos += length
    if pos != start or transfer_syntax is None or not _is_uid_text(transfer_syntax):
        raise _Unsure
    if data[start + 1] == 0 and data[start] in (0x00, 0x02):
        raise _Unsure
    return transfer_syntax


def _meta_outcome(meta: Callable[[bytes, int], str], data: bytes) -> object:
    start = _data_set_start(data)
    if start + 8 > len(data):
        return "not walked"  # _fast_elements leaves it to the reference path before
    try:
        return meta(data, start)
    except (_Unsure, struct.error):
        return "unsure"


_FIRST_ELEMENT = b"\x08\x00\x05\x00CS\x00\x00"  # of a data set after the File Meta


def _meta(elements: list[tuple[int, str, bytes]], after: bytes = _FIRST_ELEMENT) -> bytes:
    """An object whose File Meta has these (element, VR, value) after its group length."""
    body = b""
    for element, vr, value in elements:
        if vr.encode() in _LONG_VR:
            body += struct.pack("<HH2s2xL", 0x0002, element, vr.encode(), len(value)) + value
        else:
            body += struct.pack("<HH2sH", 0x0002, element, vr.encode(), len(value) & 0xFFFF) + value
    return b"\x00" * 128 + b"DICM" + struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body)) + body + after


_STANDARD_ELEMENTS = [
    (0x0001, "OB", b"\x00\x01"), (0x0002, "UI", b"1.2.840.10008.5.1.4.1.1.2\x00"), (0x0003, "UI", b"1.2.3.4\x00"),
    (0x0010, "UI", b"1.2.840.10008.1.2.1\x00"), (0x0012, "UI", b"1.2.826.0.1.3680043.9.3811.3.0.4"),
    (0x0013, "SH", b"PYNETDICOM_304"), (0x0016, "AE", b"STORESCU"),
]


def test_file_meta_as_the_walk_found_it() -> None:
    rng = random.Random(17)
    metas = [file_meta_bytes("1.2.3", "1.2.3.4", syntax) + _FIRST_ELEMENT
             for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50", "1.2.3.4.5")]
    for _ in range(600):
        elements = [element for element in _STANDARD_ELEMENTS if element[0] == 0x0010 or rng.random() < 0.7]
        if rng.random() < 0.5:  # one element otherwise: another value, VR, tag, order, or an extra one
            i = rng.randrange(len(elements))
            element, vr, value = elements[i]
            change = rng.randrange(8)
            if change == 0:
                size = rng.choice((0, 1, 2, 3, 63, 64, 65, 66, 70))
                value = bytes(rng.choice(b"0123456789. \x00a") for _ in range(size))
            elif change == 1:
                vr = rng.choice(("UI", "LO", "OB", "UN", "XX", "SH", "AE", "UL"))
            elif change == 2:
                element = rng.choice((0x0000, 0x0011, 0x0100, 0x0102, element + 1))
            elif change == 3 and len(elements) > 1:
                elements[i], elements[i - 1] = elements[i - 1], elements[i]
                element, vr, value = elements[i]
            elif change == 4:
                extra = rng.choice((0x0017, 0x0100, 0x0102, 0x0001))
                elements.insert(i, (extra, rng.choice(("OB", "AE", "UI")), b"AB"))
            elif change == 5:
                value = value[:-1] if value else b"1"
            elif change == 6:  # a standard one again, or one the pattern leaves out, anywhere
                extra = rng.choice((0x0000, 0x0001, 0x0002, 0x0003, 0x0010, 0x0011, 0x0012, 0x0013, 0x0016, 0x0100))
                elements.insert(rng.randrange(len(elements) + 1), (extra, "UI", b"1.2.840.10008.1.2\x00"))
                element, vr, value = elements[i]
            elements[i] = (element, vr, value)
        # a data set, more File Meta, a command set, too short a data set
        after = rng.choice((_FIRST_ELEMENT, b"\x02\x00\x00\x00UL\x04\x00", b"\x00\x00\x00\x00UL\x04\x00", b"\x08"))
        metas.append(_meta(elements, after))
    standard = 0
    for data in metas:
        for candidate in (data, data[: rng.randrange(144, len(data) + 1)]):
            assert _meta_outcome(_fast_meta, candidate) == _meta_outcome(_loop_meta, candidate), candidate[128:]
        start = _data_set_start(data)
        standard += start + 8 <= len(data) and _STANDARD_META.fullmatch(data, 144, start) is not None
    assert standard > 200  # the pattern took many, the walk the others
    assert all(_is_uid_text(syntax) for syntax in _LITTLE_ENDIAN_SYNTAXES)  # taken as UID text untested


def test_file_meta_elements_out_of_order_or_twice() -> None:
    """Each standard element swapped with the next, and each element (standard or not) again
    at each place: the pattern takes none of those the walk refuses."""
    metas = []
    for i in range(len(_STANDARD_ELEMENTS) - 1):
        swapped = list(_STANDARD_ELEMENTS)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        metas.append(_meta(swapped))
    for extra in (0x0000, 0x0001, 0x0002, 0x0003, 0x0010, 0x0011, 0x0012, 0x0013, 0x0016, 0x0017, 0x0100):
        for vr, value in (("UI", b"1.2.840.10008.1.2\x00"), ("OB", b"\x00\x01"), ("SH", b"ABCD"), ("AE", b"ABCD")):
            for place in range(len(_STANDARD_ELEMENTS) + 1):
                elements = list(_STANDARD_ELEMENTS)
                elements.insert(place, (extra, vr, value))
                metas.append(_meta(elements))
    for data in metas:
        assert _meta_outcome(_fast_meta, data) == _meta_outcome(_loop_meta, data), data[128:]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's, reading some test files
def test_test_file_metas_as_the_walk_found_them() -> None:
    rng = random.Random(19)
    for path in _test_files():
        for data in _encodings(path)[:2]:
            if data[128:132] != b"DICM":
                continue
            assert _meta_outcome(_fast_meta, data) == _meta_outcome(_loop_meta, data)
            for _ in range(4):
                damaged = bytearray(data)
                damaged[rng.randrange(140, min(len(data), 400))] = rng.randrange(256)
                assert _meta_outcome(_fast_meta, bytes(damaged)) == _meta_outcome(_loop_meta, bytes(damaged))


def test_a_transfer_syntax_longer_than_a_uid() -> None:
    """The fast path hands ``_checked_header`` the transfer syntax as valid only up to 64
    characters, as ``valid_uid`` takes it."""
    for syntax in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1." + "1" * 44, "1.2.840.10008.1.2.1." + "1" * 45):
        ds = pydicom.dcmread(Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm")
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        start = _data_set_start(data)
        data = file_meta_bytes(ds.SOPClassUID, ds.SOPInstanceUID, syntax) + data[start:]
        _check(data)


# --------------------------------------------------------------------------- objects made without __init__


def test_elements_made_from_their_attributes_equal_constructed_ones() -> None:
    assert _ELEMENT_BY_STATE
    for tag, vr, value in ((0x00100020, "LO", "PID"), (0x00280010, "US", 512), (0x00080018, "UI", "1.2.3")):
        made = _plain_element(BaseTag(tag), vr, value, 12, settings.reading_validation_mode)
        constructed = DataElement(BaseTag(tag), vr, value, 12, False, already_converted=True)
        assert list(vars(made).items()) == list(vars(constructed).items())
        assert made == constructed and made.value == constructed.value and made.keyword == constructed.keyword


def test_rest_runs_take_what_the_rest_walk_stepped_over() -> None:
    """Any tag, the short VRs, even values up to 64 bytes; nothing else."""
    for implicit, run in ((False, _EXPLICIT_RUN), (True, _IMPLICIT_RUN)):
        for tag in (0x00000000, 0x00280010, 0x7FE00010, 0xFFFEE000, 0xFFFFFFFF):
            for vr in (b"SS", b"OB", b"UN", b"XX"):
                for length in (0, 1, 2, 64, 65, 66):
                    if implicit:
                        element = struct.pack("<HHL", tag >> 16, tag & 0xFFFF, length) + b"x" * length
                        expected = length % 2 == 0 and length <= 64
                    else:
                        element = struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, length) + b"x" * length
                        expected = vr in _SHORT_VR and length % 2 == 0 and length <= 64
                    assert (run.fullmatch(element) is not None) == expected, (implicit, hex(tag), vr, length)
                    _check_walks(element, 0)
                    _check_walks(element * 3, 0)


@pytest.mark.parametrize("length", range(136, 146))
def test_meta_group_length_cut_short_is_refused_as_the_reference_refuses_it(length: int) -> None:
    # 140-143 bytes: the (0002,0000) header is whole but its value is not; this raised
    # struct.error (a processing failure on the wire) before
    data = (b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\x00" * 40)[:length]
    with pytest.raises(InvalidObjectError) as fast:
        parse_header(data, max_pixels=1 << 29)
    with pytest.raises(InvalidObjectError) as reference:
        parse_header_reference(data, max_pixels=1 << 29)
    assert (fast.value.status, fast.value.reason) == (reference.value.status, reference.value.reason)
