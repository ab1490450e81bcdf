"""DICOM Upper Layer PDUs on the acceptor's side (PS3.8 9.3): framing and the fixed-form PDUs.

Only what an acceptor reads and writes outside association negotiation lives here:
reading one PDU off a stream, splitting a P-DATA-TF into its presentation data value
items, and encoding the short PDUs (P-DATA with one PDV, A-ASSOCIATE-RJ, A-RELEASE-RP,
A-ABORT). The A-ASSOCIATE-RQ and -AC PDUs, with their variable items, are decoded and
encoded by pynetdicom (``listener.acceptor``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_TYPES = frozenset(range(A_ASSOCIATE_RQ, A_ABORT + 1))

# A-ABORT source and reasons (PS3.8 9.3.8); the provider's reasons apply to source 2.
ABORT_SOURCE_USER = 0x00
ABORT_SOURCE_PROVIDER = 0x02
ABORT_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNISED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_UNEXPECTED_PARAMETER = 0x05
ABORT_INVALID_PARAMETER = 0x06

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)

# An A-ASSOCIATE-RQ is a few kB; this bounds what a peer can make us buffer before we
# have accepted anything.
MAX_ASSOCIATE_RQ_BYTES = 1 << 20
# Above this, a PDU body is read in pieces, so memory follows the bytes that arrive,
# not the length a peer claims.
_CHUNK = 1 << 20

_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")


class ProtocolError(Exception):
    """The peer broke the Upper Layer protocol; the association is aborted with ``reason``."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PeerClosed(Exception):
    """The transport closed (or ended in the middle of a PDU)."""


@dataclass(frozen=True)
class PDU:
    type: int
    body: bytes  # everything after the 6-byte header

    def raw(self) -> bytes:
        return _HEADER.pack(self.type, len(self.body)) + self.body


def _read_exact(stream: BinaryIO, length: int) -> bytes:
    if length <= _CHUNK:
        data = stream.read(length)
        if data is None or len(data) != length:
            raise PeerClosed(f"transport closed {length - len(data or b'')} bytes before the end of a PDU")
        return data
    pieces = []
    left = length
    while left:
        piece = stream.read(min(left, _CHUNK))
        if not piece:
            raise PeerClosed(f"transport closed {left} bytes before the end of a PDU")
        pieces.append(piece)
        left -= len(piece)
    return b"".join(pieces)


def read_pdu(stream: BinaryIO, max_length: int) -> PDU:
    """The next PDU from ``stream``; ``max_length`` bounds its body (0: no bound)."""
    header = stream.read(_HEADER.size)
    if not header:
        raise PeerClosed("transport closed")
    if len(header) != _HEADER.size:
        raise PeerClosed("transport closed inside a PDU header")
    pdu_type, length = _HEADER.unpack(header)
    if pdu_type not in PDU_TYPES:
        raise ProtocolError(ABORT_UNRECOGNISED_PDU, f"unrecognised PDU type 0x{pdu_type:02X}")
    if max_length and length > max_length:
        raise ProtocolError(ABORT_INVALID_PARAMETER, f"PDU of {length} bytes over the maximum of {max_length}")
    return PDU(pdu_type, _read_exact(stream, length))


@dataclass(frozen=True)
class PDV:
    """One presentation data value item (PS3.8 9.3.5.1, message control header E.2)."""

    context_id: int
    is_command: bool
    is_last: bool
    fragment: memoryview


def iter_pdvs(body: bytes) -> Iterator[PDV]:
    """The PDV items of a P-DATA-TF body, in order."""
    view = memoryview(body)
    pos, end = 0, len(body)
    if end == 0:
        raise ProtocolError(ABORT_INVALID_PARAMETER, "P-DATA-TF without a presentation data value")
    while pos < end:
        if end - pos < _PDV_HEADER.size:
            raise ProtocolError(ABORT_INVALID_PARAMETER, "truncated presentation data value item")
        length, context_id, control = _PDV_HEADER.unpack_from(body, pos)
        if length < 2 or pos + 4 + length > end:
            raise ProtocolError(ABORT_INVALID_PARAMETER, f"presentation data value item length {length} out of range")
        if context_id % 2 == 0:
            raise ProtocolError(ABORT_INVALID_PARAMETER, f"even presentation context ID {context_id}")
        yield PDV(context_id, bool(control & 0x01), bool(control & 0x02), view[pos + 6 : pos + 4 + length])
        pos += 4 + length


def p_data(context_id: int, payload: bytes, *, is_command: bool, max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying ``payload`` as one message part, split to fit ``max_pdu``
    (the peer's maximum length, 0: none); the last fragment is flagged last."""
    room = max_pdu - 6 if max_pdu else len(payload) or 1  # 6: PDV item length + context ID + control
    if room <= 0:
        room = len(payload) or 1
    out = []
    chunks = [payload[i : i + room] for i in range(0, len(payload), room)] or [b""]
    for n, chunk in enumerate(chunks):
        control = (0x01 if is_command else 0x00) | (0x02 if n == len(chunks) - 1 else 0x00)
        item = _PDV_HEADER.pack(len(chunk) + 2, context_id, control) + chunk
        out.append(_HEADER.pack(P_DATA_TF, len(item)) + item)
    return b"".join(out)


def associate_rj(result: int, source: int, diagnostic: int) -> bytes:
    return _HEADER.pack(A_ASSOCIATE_RJ, 4) + bytes((0, result, source, diagnostic))


def release_rp() -> bytes:
    return _HEADER.pack(A_RELEASE_RP, 4) + b"\x00\x00\x00\x00"


def abort(reason: int, source: int = ABORT_SOURCE_PROVIDER) -> bytes:
    if source == ABORT_SOURCE_USER:
        reason = 0  # reserved for a service user's abort (PS3.8 9.3.8)
    return _HEADER.pack(A_ABORT, 4) + bytes((0, 0, source, reason))
