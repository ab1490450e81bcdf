"""The fast path's own value decoding gives what pydicom's conversion gives.

``parse_header`` decodes plain header values itself (UI, CS, ASCII LO, US, IS) and leaves
the rest to pydicom. Over headers built byte by byte, in explicit and implicit VR little
endian: character sets, multi-valued and padded values, values pydicom's validation
objects to, VRs other than the dictionary's, empty and missing elements, sequences,
custom pydicom hooks; and over random values: the outcome equals
``parse_header_reference``'s (see ``test_fast_header._outcome``), and the fast path
took the object.
"""

from __future__ import annotations

import random
import re
import struct
import warnings
from collections.abc import Callable, Iterator

import pytest
from pydicom import config as pydicom_config
from pydicom import hooks as pydicom_hooks
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from listener.classify import classify
from listener.config import ReportConfig
from listener.header import (
    _DATASET_STATE,
    _ELEMENT_BY_STATE,
    _ENCODING_ATTRIBUTES,
    HEADER_TAGS,
    InvalidObjectError,
    ObjectHeader,
    _fast_elements,
    _is_uid_text,
    _new_dataset,
    _plain_element,
    file_meta_bytes,
    parse_header,
    parse_header_reference,
)
from tests.listener.test_fast_header import _check

_LONG_VR = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_CT = "1.2.840.10008.5.1.4.1.1.2"
_SR = "1.2.840.10008.5.1.4.1.1.88.33"

# (tag, VR, value) of a plain CT header, in tag order
_BASE: dict[int, tuple[str, bytes]] = {
    0x00080005: ("CS", b"ISO_IR 100"),
    0x00080016: ("UI", _CT.encode() + b"\x00"),
    0x00080018: ("UI", b"1.2.3.4.5\x00"),
    0x00080060: ("CS", b"CT"),
    0x00080070: ("LO", b"ACME"),
    0x0008103E: ("LO", b"CHEST "),
    0x00100010: ("PN", b"DOE^JOHN"),
    0x00100020: ("LO", b"PID-1 "),
    0x0020000D: ("UI", b"1.2.3.4\x00"),
    0x0020000E: ("UI", b"1.2.3.4.6\x00"),
    0x00280008: ("IS", b"1 "),
    0x00280010: ("US", struct.pack("<H", 4)),
    0x00280011: ("US", struct.pack("<H", 4)),
    0x00280100: ("US", struct.pack("<H", 16)),
    0x7FE00010: ("OW", b"\x00" * 32),
}


def _element(tag: int, vr: str, value: bytes, implicit: bool) -> bytes:
    group, element = tag >> 16, tag & 0xFFFF
    if implicit:
        return struct.pack("<HHL", group, element, len(value)) + value
    if vr in _LONG_VR:
        return struct.pack("<HH2s2xL", group, element, vr.encode(), len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def _object(changes: dict[int, tuple[str, bytes] | None], implicit: bool) -> bytes:
    """A complete object: File Meta, then ``_BASE`` with ``changes`` (None removes an element)."""
    elements = {**_BASE, **changes}
    body = b"".join(
        _element(tag, *spec, implicit) for tag, spec in sorted(elements.items()) if spec is not None
    )
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return file_meta_bytes(_CT, "1.2.3.4.5", syntax) + body


def _warnings(parse: Callable[..., ObjectHeader], data: bytes) -> set[str]:
    """What pydicom warns while ``parse`` reads ``data``: the fast path decodes only values
    pydicom would not warn about, so that the log says the same. (Distinct messages: pydicom's
    reader converts the character set three times, and warns as often about an unknown one.)"""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parse(data, max_pixels=10**12)
        except InvalidObjectError:
            pass
    return {str(w.message) for w in caught}


def _check_both(changes: dict[int, tuple[str, bytes] | None]) -> None:
    for implicit in (False, True):
        data = _object(changes, implicit)
        assert _check(data), (changes, implicit)  # the same outcome, and the fast path took it
        assert _warnings(parse_header, data) == _warnings(parse_header_reference, data), (changes, implicit)


_CHARSETS = [
    b"", b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 101", b"ISO_IR 109", b"ISO_IR 110", b"ISO_IR 126", b"ISO_IR 127",
    b"ISO_IR 138", b"ISO_IR 144", b"ISO_IR 148", b"ISO_IR 166", b"ISO_IR 203", b"ISO_IR 192", b"GB18030", b"GBK",
    b"ISO_IR 13", b"ISO 2022 IR 6", b"ISO 2022 IR 87", b"ISO 2022 IR 149", b"\\ISO 2022 IR 100", b"ISO 2022 IR 100",
    b"\\ISO 2022 IR 87", b"ISO_IR 100\\ISO_IR 144", b"NOT A CHARSET", b"iso_ir 100", b"ISO_IR 192\x00", b"ISO_IR 100 ",
]
_TEXTS = [
    b"", b" ", b"  ", b"PID-1", b"PID-1 ", b"PID-1\x00", b"PID-1\x00\x00", b" PID-1", b"A\\B", b"A\\", b"\\",
    b"x" * 64, b"x" * 65, b"x" * 63 + b"\x00", b"A\x00B", b"A\tB", b"A\x01B", b"A\x7fB", b"M\xfcller", b"M\xc3\xbcller",
    b"\x1b$B\x3b\x33\x45\x44\x1b(B", b"~", b"A^B=C",
]


@pytest.mark.parametrize("charset", _CHARSETS)
def test_text_values_under_every_character_set(charset: bytes) -> None:
    for text in _TEXTS:
        _check_both({
            0x00080005: ("CS", charset),
            0x00100020: ("LO", text),
            0x00080070: ("LO", text),
            0x0008103E: ("LO", text[::-1]),
        })


def test_without_a_character_set() -> None:
    for text in _TEXTS:
        _check_both({0x00080005: None, 0x00100020: ("LO", text), 0x00080070: ("LO", text)})


def test_character_set_of_another_vr_or_empty() -> None:
    _check_both({0x00080005: ("CS", b"")})
    _check_both({0x00080005: ("LO", b"ISO_IR 100"), 0x00100020: ("LO", b"M\xfcller")})
    _check_both({0x00080005: ("UN", b"ISO_IR 192"), 0x00100020: ("LO", b"M\xc3\xbcller")})


_CODE_STRINGS = [
    b"", b"CT", b"CT ", b"CT\x00", b"CT\\MR", b"CT\\", b"ct", b" CT", b"C T", b"SR", b"X" * 17, b"\xe9", b"CT\x00 ", b"OT ",
]


def test_code_strings() -> None:
    for value in _CODE_STRINGS:
        _check_both({0x00080060: ("CS", value)})
        _check_both({0x00080060: ("CS", value), 0x00080016: ("UI", _SR.encode() + b"\x00")})  # SR: the report test


_UIDS = [
    b"1.2.3", b"1.2.3\x00", b"1.2.3 ", b"1.2.3\x00\x00", b" 1.2.3", b"1.2.3\\1.2.4", b"1.2.3\\", b"1.02.3", b"01.2",
    b"1..2", b"1.2.", b".1.2", b"1.2.a", b"", b"\x00", b"  ", b"1." + b"2" * 62, b"1." + b"2" * 63, b"1." + b"2" * 62 + b"\x00",
    b"0", b"0.0", b"1.2.3\n", b"1.2.3\x00x", b"1.2.3\xff", b"\xd9\xa1.2",
]


def test_uids() -> None:
    for uid in _UIDS:
        for tag in (0x00080016, 0x00080018, 0x0020000D, 0x0020000E):
            _check_both({tag: ("UI", uid)})


_NUMBERS = [b"", b"1", b"1 ", b" 1", b"001", b"0", b"+1", b"-1", b"1\\2", b"1A", b"1.0", b"123456789012", b"1234567890123",
            b"1\x00", b"\x00", b"  ", b"\xd9\xa1"]


def test_image_size_values() -> None:
    for frames in _NUMBERS:
        _check_both({0x00280008: ("IS", frames)})
    for size in (b"", struct.pack("<H", 0), struct.pack("<H", 65535), struct.pack("<HH", 4, 4), b"\x04", b"\x04\x00\x00"):
        _check_both({0x00280010: ("US", size)})
        _check_both({0x00280011: ("US", size), 0x00280008: None})


def test_values_under_another_vr() -> None:
    """Explicit VRs other than the dictionary's: pydicom decodes by the VR in the file."""
    cases: list[dict[int, tuple[str, bytes] | None]] = [
        {0x00280010: ("SS", struct.pack("<h", -4))},
        {0x00280010: ("UL", struct.pack("<L", 4))},
        {0x00280010: ("UN", struct.pack("<H", 4))},
        {0x00280010: ("IS", b"4 ")},
        {0x00280008: ("US", struct.pack("<H", 2))},
        {0x00280008: ("UN", b"2 ")},
        {0x00080060: ("LO", b"ct")},
        {0x00080060: ("UN", b"CT")},
        {0x00080060: ("SH", b"CT")},
        {0x00100020: ("SH", b"PID-1 ")},
        {0x00100020: ("UT", b"PID-1 ")},
        {0x00100020: ("UN", b"PID-1 ")},
        {0x00080018: ("LO", b"1.2.3.4.5 ")},
        {0x00080018: ("UN", b"1.2.3.4.5\x00")},
        {0x00080018: ("OB", b"1.2.3.4.5\x00")},
        {0x00080070: ("PN", b"ACME")},
    ]
    for changes in cases:
        _check_both(changes)


def test_missing_header_elements() -> None:
    for tag in (0x00080005, 0x00080016, 0x00080018, 0x00080060, 0x00080070, 0x0008103E, 0x00100020,
                0x0020000D, 0x0020000E, 0x00280008, 0x00280010, 0x00280011):
        _check_both({tag: None})
    _check_both({0x00280010: None, 0x00280011: None, 0x00080016: ("UI", b"1.2.826.0.1.3680043.2.1\x00")})
    _check_both({t: None for t in (0x00080060, 0x00080070, 0x0008103E, 0x00100020, 0x00280008, 0x00280010, 0x00280011)})


def test_header_ends_the_data_set() -> None:
    _check_both({0x00280100: None, 0x7FE00010: None})
    _check_both({0x00280100: None, 0x7FE00010: None, 0x00280011: None, 0x00280010: None})


def test_coding_scheme_sequence_of_an_sr() -> None:
    item = _element(0x00080102, "SH", b"99DSKI", False) + _element(0x00080112, "LO", b"99DSKI", False)
    implicit_item = _element(0x00080102, "SH", b"99DSKI", True) + _element(0x00080112, "LO", b"99DSKI", True)
    for implicit, body in ((False, item), (True, implicit_item)):
        sequence = struct.pack("<HHL", 0xFFFE, 0xE000, len(body)) + body
        data = _object({
            0x00080016: ("UI", _SR.encode() + b"\x00"),
            0x00080060: ("CS", b"SR"),
            0x00080110: ("SQ", sequence),
            0x00280010: None, 0x00280011: None, 0x00280008: None,
        }, implicit)
        assert _check(data)
        assert classify(parse_header(data, max_pixels=10**12).dataset, ReportConfig()).kind == "own-report"
    _check_both({0x00080110: ("SQ", b"")})


def test_own_report_by_its_manufacturer() -> None:
    cfg = ReportConfig()
    changes: dict[int, tuple[str, bytes] | None] = {
        0x00080016: ("UI", _SR.encode() + b"\x00"),
        0x00080060: ("CS", b"SR"),
        0x00080070: ("LO", cfg.manufacturer.encode() + b" "),
        0x0008103E: ("LO", cfg.series_description.encode()),
        0x00280010: None, 0x00280011: None, 0x00280008: None,
    }
    _check_both(changes)
    assert classify(parse_header(_object(changes, False), max_pixels=10**12).dataset, cfg).kind == "own-report"


def test_private_and_unknown_elements_between() -> None:
    _check_both({
        0x00090010: ("LO", b"ACME 1.0"),
        0x00091001: ("UN", b"\x01\x02"),
        0x00191001: ("LO", b"ACME\\X"),
        0x00210010: ("LO", b"PRIVATE"),
        0x00281040: ("CS", b"LIN"),
    })


@pytest.mark.parametrize("seed", range(4))
def test_random_values(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = b"0123456789.\\ \x00\x1b\xc3\xbc\xe9ACTMRSOPISO_IR1 \t-+^=abc"
    vrs = {"UI": ["UI", "LO", "UN"], "CS": ["CS", "LO", "UN"], "LO": ["LO", "SH", "UN", "UT"],
           "US": ["US", "SS", "UN"], "IS": ["IS", "US", "UN"]}
    for _ in range(150):
        changes: dict[int, tuple[str, bytes] | None] = {}
        for tag in rng.sample(sorted(_BASE), 4):
            vr = _BASE[tag][0]
            if tag == 0x7FE00010 or vr not in vrs:
                continue
            if rng.random() < 0.1:
                changes[tag] = None
                continue
            if vr == "US" and rng.random() < 0.7:
                value = bytes(rng.randrange(256) for _ in range(rng.choice((0, 1, 2, 2, 2, 4))))
            elif rng.random() < 0.5:
                value = _BASE[tag][1] + bytes(rng.choice(alphabet) for _ in range(rng.randrange(3)))
            else:
                value = bytes(rng.choice(alphabet) for _ in range(rng.randrange(70)))
            changes[tag] = (rng.choice(vrs[vr]) if rng.random() < 0.2 else vr, value)
        _check_both(changes)


@pytest.fixture()
def custom_pydicom() -> Iterator[None]:
    """pydicom configured otherwise than by default, as an application may."""
    previous = (pydicom_hooks.hooks.raw_element_value, dict(pydicom_hooks.hooks.raw_element_kwargs),
                pydicom_config.use_none_as_empty_text_VR_value)
    pydicom_hooks.hooks.register_callback("raw_element_value", pydicom_hooks.raw_element_value_fix_separator)
    pydicom_hooks.hooks.register_kwargs("raw_element_kwargs", {"target_VRs": ("CS", "LO", "UI"), "separator": b":"})
    pydicom_config.use_none_as_empty_text_VR_value = True
    yield
    pydicom_hooks.hooks.raw_element_value = previous[0]
    pydicom_hooks.hooks.raw_element_kwargs = previous[1]
    pydicom_config.use_none_as_empty_text_VR_value = previous[2]


def test_custom_pydicom_hooks_and_settings(custom_pydicom: None) -> None:
    _check_both({0x00080060: ("CS", b"CT:MR"), 0x00100020: ("LO", b"A:B"), 0x00080070: ("LO", b"")})
    _check_both({0x00080018: ("UI", b"1.2.3:1.2.4"), 0x0008103E: ("LO", b"")})


def test_the_fast_path_takes_plain_headers() -> None:
    """Without this the tests above could compare the reference with itself."""
    assert _fast_elements(_object({}, False)) is not None
    assert _fast_elements(_object({}, True)) is not None


def test_data_sets_and_elements_are_set_up_as_pydicom_does() -> None:
    for implicit, encoding in ((False, "iso8859"), (True, ["latin_1"]), (False, ["iso8859", "iso2022_jp"])):
        reference = Dataset({})
        reference.set_original_encoding(implicit, True, encoding)
        built = _new_dataset({}, implicit, encoding)
        assert vars(built) == vars(reference)
        assert vars(built)["_private_blocks"] is not vars(_new_dataset({}, implicit, encoding))["_private_blocks"]
    assert _ELEMENT_BY_STATE  # this pydicom's DataElement: the fast set-up is the one in use
    assert _DATASET_STATE is not None and _ENCODING_ATTRIBUTES is not None  # and this pydicom's Dataset
    tag = BaseTag(0x00100020)
    mode = pydicom_config.settings.reading_validation_mode
    assert vars(_plain_element(tag, "LO", "PID", 12, mode)) == vars(
        DataElement(tag, "LO", "PID", 12, False, already_converted=True)
    )


def test_header_dataset_lookups_equal_datasets() -> None:
    """The fast path's data set answers ``get`` and ``in`` as a plain Dataset does."""
    changes: dict[int, tuple[str, bytes] | None] = {0x00280008: None, 0x00080060: ("CS", b"CT\\MR")}
    for implicit in (False, True):
        ds = parse_header(_object(changes, implicit), max_pixels=10**12).dataset
        assert isinstance(ds, Dataset)
        keys: list[object] = [*HEADER_TAGS, "PatientName", "BitsAllocated", "NotAKeyword", "file_meta", 0x00080018,
                              (0x0028, 0x0010), BaseTag(0x00280011), 0x00280008]
        for key in keys:
            assert ds.get(key, "absent") == Dataset.get(ds, key, "absent"), key  # type: ignore[arg-type]
            if key not in ("NotAKeyword", "file_meta"):  # pydicom warns about those, in both
                assert (key in ds) == Dataset.__contains__(ds, key), key  # type: ignore[arg-type]
        ds.Modality = "OT"  # a Dataset still: set, delete, read back
        assert ds.get("Modality") == "OT"
        del ds.Rows
        assert "Rows" not in ds
        assert ds.get("Rows") is None


def test_uid_text_test_equals_the_uid_pattern() -> None:
    pattern = re.compile(r"[0-9]+(\.[0-9]+)*")
    rng = random.Random(7)
    texts = ["", ".", "..", "1", "1.", ".1", "1..2", "1.2", "0.0", "1.2.3\n", "\u0663", "1.\u0663", "12.34.56", " 1", "1 "]
    texts += ["".join(rng.choice("0123456789..\n \u0663a") for _ in range(rng.randrange(8))) for _ in range(3000)]
    for text in texts:
        assert _is_uid_text(text) == (pattern.fullmatch(text) is not None), repr(text)
