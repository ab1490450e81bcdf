"""DIMSE command sets the listener reads and writes, and the statuses it answers with.

A command set is group 0000 in Implicit VR Little Endian (PS3.7 E.1). The listener
reads requests and writes C-STORE and C-ECHO responses (PS3.7 9.3.1, 9.3.5); the
statuses are those of the Storage service (PS3.4 B.2.3) and PS3.7 C.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000  # not a parseable DICOM dataset
STATUS_BAD_UID = 0xC001  # a required UID is missing or malformed
STATUS_UID_MISMATCH = 0xC002  # the dataset's SOP Instance UID differs from the command's
STATUS_TOO_LARGE = 0xC003  # Rows x Columns x Frames over listener.max_pixels
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_UNRECOGNISED_OPERATION = 0x0211  # a DIMSE service this node does not provide

C_STORE_RQ = 0x0001
C_ECHO_RQ = 0x0030
C_CANCEL_RQ = 0x0FFF
RESPONSE_BIT = 0x8000
NO_DATA_SET = 0x0101  # Command Data Set Type (0000,0800) when no data set follows

_TAG_VALUE = struct.Struct("<HHL")
_US = struct.Struct("<H")
_MAX_COMMAND_BYTES = 64 * 1024  # a real command set is a few hundred bytes


class CommandError(ValueError):
    """A command set that cannot be read (truncated, wrong group, missing a required element)."""


@dataclass(frozen=True)
class Command:
    """The elements of a request command set the listener acts on."""

    command_field: int
    message_id: int
    has_data_set: bool
    affected_sop_class_uid: str | None
    affected_sop_instance_uid: str | None

    @property
    def is_request(self) -> bool:
        return not self.command_field & RESPONSE_BIT


def _uid_text(value: bytes) -> str:
    return value.decode("ascii", errors="replace").rstrip("\x00 ")


def decode_command(raw: bytes) -> Command:
    """Read a request command set (PS3.7 E.1); raise ``CommandError`` when it is malformed."""
    if len(raw) > _MAX_COMMAND_BYTES:
        raise CommandError(f"command set of {len(raw)} bytes")
    values: dict[int, bytes] = {}
    pos, end = 0, len(raw)
    while pos < end:
        if end - pos < _TAG_VALUE.size:
            raise CommandError("truncated command element")
        group, element, length = _TAG_VALUE.unpack_from(raw, pos)
        pos += _TAG_VALUE.size
        if group != 0x0000:
            raise CommandError(f"element ({group:04X},{element:04X}) outside the command group")
        if pos + length > end:
            raise CommandError(f"command element (0000,{element:04X}) runs past the end")
        values[element] = raw[pos : pos + length]
        pos += length
    try:
        command_field = _US.unpack(values[0x0100])[0]
        data_set_type = _US.unpack(values[0x0800])[0]
    except (KeyError, struct.error) as exc:
        raise CommandError("command set without a valid Command Field or Command Data Set Type") from exc
    message_id = values.get(0x0110)
    if message_id is not None and len(message_id) != 2:
        raise CommandError("Message ID is not a US value")
    sop_class = values.get(0x0002)
    sop_instance = values.get(0x1000)
    return Command(
        command_field=command_field,
        message_id=_US.unpack(message_id)[0] if message_id is not None else 0,
        has_data_set=data_set_type != NO_DATA_SET,
        affected_sop_class_uid=_uid_text(sop_class) if sop_class is not None else None,
        affected_sop_instance_uid=_uid_text(sop_instance) if sop_instance is not None else None,
    )


def _element(element: int, value: bytes) -> bytes:
    return _TAG_VALUE.pack(0x0000, element, len(value)) + value


def _even(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", errors="replace")
    return raw + pad if len(raw) % 2 else raw


def encode_response(request: Command, status: int, error_comment: str | None = None) -> bytes:
    """The response command set to ``request`` (PS3.7 9.3: Affected SOP Class and Instance
    UIDs echoed when the request had them; Error Comment, LO, at most 64 characters)."""
    elements = []
    if request.affected_sop_class_uid is not None:
        elements.append(_element(0x0002, _even(request.affected_sop_class_uid, b"\x00")))
    elements.append(_element(0x0100, _US.pack(request.command_field | RESPONSE_BIT)))
    elements.append(_element(0x0120, _US.pack(request.message_id)))
    elements.append(_element(0x0800, _US.pack(NO_DATA_SET)))
    elements.append(_element(0x0900, _US.pack(status)))
    if error_comment and status != STATUS_SUCCESS:
        elements.append(_element(0x0902, _even(error_comment.replace("\\", "/")[:64], b" ")))
    if request.affected_sop_instance_uid is not None:
        elements.append(_element(0x1000, _even(request.affected_sop_instance_uid, b"\x00")))
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<L", len(body))) + body
