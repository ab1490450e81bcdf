"""The association acceptor on the wire: negotiation, DIMSE, fragmentation, protocol errors.

The acceptor runs for real on a loopback socket; its peers are pynetdicom's SCU (a
different implementation of the same protocol) and raw sockets for what no
well-behaved peer sends. The store callback is a recorder: what the node does with a
store is tested in test_scp.py.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from io import BytesIO

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.filereader import read_dataset
from pynetdicom import AE, build_role
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    Verification,
)

from listener import upper_layer as ul
from listener.acceptor import (
    AcceptorCallbacks,
    AcceptorSettings,
    AssociationAcceptor,
    Status,
    StoreRequest,
    listening_socket,
)
from listener.dimse import (
    STATUS_SUCCESS,
    STATUS_UNRECOGNISED_OPERATION,
    Command,
    CommandError,
    decode_command,
    encode_response,
)
from listener.scp import supported_contexts

AET = "DSKI"


class Recorder:
    def __init__(self, status: int = STATUS_SUCCESS) -> None:
        self.requests: list[StoreRequest] = []
        self.status = status
        self.lock = threading.Lock()

    def __call__(self, request: StoreRequest) -> Status:
        with self.lock:
            self.requests.append(request)
        return Status(self.status, "" if self.status == STATUS_SUCCESS else "refused by test")


def _settings(**overrides: object) -> AcceptorSettings:
    values: dict[str, object] = {
        "ae_title": AET,
        "require_called_ae_title": True,
        "max_associations": 4,
        "acse_timeout": 5.0,
        "dimse_timeout": 5.0,
        "network_timeout": 5.0,
        "max_pdu_bytes": 16384,
    }
    values.update(overrides)
    return AcceptorSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def _start(recorder: Recorder, permits=lambda calling, address: calling != "STRANGER", **settings: object):
    acceptor = AssociationAcceptor(_settings(**settings), supported_contexts(), AcceptorCallbacks(permits, recorder))
    acceptor.start(listening_socket("127.0.0.1", 0))
    return acceptor


@pytest.fixture
def acceptor(recorder: Recorder) -> Iterator[AssociationAcceptor]:
    a = _start(recorder)
    yield a
    a.stop(1)


def _scu(aet: str = "PYSCU", max_pdu: int = 16382) -> AE:
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    return ae


def _ct() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


# --------------------------------------------------------------------------- with pynetdicom's SCU


def test_echo_store_and_release_with_pynetdicom(acceptor: AssociationAcceptor, recorder: Recorder) -> None:
    host, port = acceptor.address
    assoc = _scu().associate(host, port, ae_title=AET)
    assert assoc.is_established
    assert acceptor.active_associations() == 1
    assert assoc.send_c_echo().Status == STATUS_SUCCESS
    ct = _ct()
    status = assoc.send_c_store(ct)
    assert status.Status == STATUS_SUCCESS
    assoc.release()
    assert assoc.is_released
    (request,) = recorder.requests
    assert request.command.affected_sop_instance_uid == ct.SOPInstanceUID
    assert request.command.affected_sop_class_uid == ct.SOPClassUID
    assert request.peer.calling_ae == "PYSCU" and request.peer.called_ae == AET
    # the data set arrives exactly as encoded by the sender, in the context's transfer syntax
    decoded = read_dataset(BytesIO(request.data_set), is_implicit_VR=True, is_little_endian=True)
    assert request.transfer_syntax_uid == "1.2.840.10008.1.2"
    assert decoded.SOPInstanceUID == ct.SOPInstanceUID
    assert decoded.PixelData == ct.PixelData
    deadline = time.monotonic() + 5
    while acceptor.active_associations() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert acceptor.active_associations() == 0


def test_data_set_reassembled_from_many_small_pdus(acceptor: AssociationAcceptor, recorder: Recorder) -> None:
    host, port = acceptor.address
    assoc = _scu(max_pdu=4096).associate(host, port, ae_title=AET)
    assert assoc.is_established
    # our max PDU is 16384, the SCU's 4096: the SCU fragments its 39 kB data set to ours
    ct = _ct()
    assert assoc.send_c_store(ct).Status == STATUS_SUCCESS
    assoc.release()
    decoded = read_dataset(BytesIO(recorder.requests[0].data_set), is_implicit_VR=True, is_little_endian=True)
    assert decoded.PixelData == ct.PixelData


def test_failure_status_and_comment_reach_the_sender() -> None:
    refusing = Recorder(status=0xA700)
    acceptor = _start(refusing)
    try:
        host, port = acceptor.address
        assoc = _scu().associate(host, port, ae_title=AET)
        status = assoc.send_c_store(_ct())
        assoc.release()
    finally:
        acceptor.stop(1)
    assert status.Status == 0xA700
    assert status.ErrorComment == "refused by test"


def test_unprovided_service_gets_unrecognised_operation(acceptor: AssociationAcceptor) -> None:
    host, port = acceptor.address
    assoc = _scu().associate(host, port, ae_title=AET)
    # the FIND context is not among ours: rejected, so pynetdicom refuses to send on it
    find_contexts = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == PatientRootQueryRetrieveInformationModelFind]
    assert find_contexts == []
    assoc.release()
    # a C-FIND request on an accepted (storage) context: answered 0x0211, association kept
    with _raw_association(acceptor, [(1, Verification)]) as conn:
        query = _command(0x0020, message_id=7, sop_class=str(Verification), has_data_set=False)
        conn.sendall(ul.p_data(1, query, is_command=True, max_pdu=0))
        command = _read_response(conn)
        assert command[0x0100] == 0x8020 and command[0x0120] == 7
        assert command[0x0900] == STATUS_UNRECOGNISED_OPERATION
        conn.sendall(struct.pack(">BxL", ul.A_RELEASE_RQ, 4) + b"\x00" * 4)
        assert _read_pdu_type(conn) == ul.A_RELEASE_RP


def test_role_selection_and_async_ops_proposals_are_negotiated(acceptor: AssociationAcceptor) -> None:
    host, port = acceptor.address
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    role = build_role(CTImageStorage, scu_role=True, scp_role=False)
    assoc = _scu().associate(host, port, ae_title=AET, ext_neg=[window, role])
    assert assoc.is_established
    # no asynchronous operations answer: the defaults (1, 1) apply (PS3.7 D.3.3.3)
    assert assoc.acceptor.asynchronous_operations == (1, 1)
    assert assoc.send_c_store(_ct()).Status == STATUS_SUCCESS
    assoc.release()


def test_rejections(recorder: Recorder) -> None:
    acceptor = _start(recorder, max_associations=1)
    try:
        host, port = acceptor.address
        wrong_called = _scu().associate(host, port, ae_title="NOTDSKI")
        assert wrong_called.is_rejected
        stranger = _scu("STRANGER").associate(host, port, ae_title=AET)
        assert stranger.is_rejected
        first = _scu().associate(host, port, ae_title=AET)
        assert first.is_established
        second = _scu().associate(host, port, ae_title=AET)
        assert second.is_rejected  # over max_associations: transient, local limit exceeded
        first.release()
    finally:
        acceptor.stop(1)


def test_policy_error_rejects(recorder: Recorder) -> None:
    def broken(calling: str, address: str) -> bool:
        raise RuntimeError("policy bug")

    acceptor = _start(recorder, permits=broken)
    try:
        host, port = acceptor.address
        assert _scu().associate(host, port, ae_title=AET).is_rejected
    finally:
        acceptor.stop(1)


def test_stop_aborts_open_associations(recorder: Recorder) -> None:
    acceptor = _start(recorder)
    host, port = acceptor.address
    assoc = _scu().associate(host, port, ae_title=AET)
    assert assoc.is_established
    assert acceptor.stop(0.2) == 1
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.02)
    assert assoc.is_aborted
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=1).close()


# --------------------------------------------------------------------------- raw sockets


class _RawAssociation:
    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn

    def __enter__(self) -> socket.socket:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def _associate_rq(contexts: list[tuple[int, object]], called: str = AET, calling: str = "RAWSCU") -> bytes:
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    items = []
    for context_id, abstract in contexts:
        cx = build_context(abstract, ["1.2.840.10008.1.2"])
        cx.context_id = context_id
        items.append(cx)
    primitive.presentation_context_definition_list = items
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 0
    primitive.user_information = [max_length]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _read_pdu_type(conn: socket.socket) -> int:
    pdu = ul.read_pdu(conn.makefile("rb"), 0)
    return pdu.type


def _raw_association(acceptor: AssociationAcceptor, contexts: list[tuple[int, object]]) -> _RawAssociation:
    conn = socket.create_connection(acceptor.address, timeout=5)
    conn.sendall(_associate_rq(contexts))
    assert _read_pdu_type(conn) == ul.A_ASSOCIATE_AC
    return _RawAssociation(conn)


def _command(command_field: int, *, message_id: int, sop_class: str, has_data_set: bool, sop_instance: str | None = None) -> bytes:
    def element(elem: int, value: bytes) -> bytes:
        if len(value) % 2:
            value += b"\x00"
        return struct.pack("<HHL", 0, elem, len(value)) + value

    body = element(0x0002, sop_class.encode())
    body += element(0x0100, struct.pack("<H", command_field))
    body += element(0x0110, struct.pack("<H", message_id))
    body += element(0x0800, struct.pack("<H", 0x0000 if has_data_set else 0x0101))
    if sop_instance:
        body += element(0x1000, sop_instance.encode())
    return struct.pack("<HHL", 0, 0, 4) + struct.pack("<L", len(body)) + body


def _read_response(conn: socket.socket) -> dict[int, int]:
    pdu = ul.read_pdu(conn.makefile("rb"), 0)
    assert pdu.type == ul.P_DATA_TF
    (pdv,) = list(ul.iter_pdvs(pdu.body))
    assert pdv.is_command and pdv.is_last
    raw = bytes(pdv.fragment)
    values: dict[int, int] = {}
    pos = 0
    while pos < len(raw):
        _, elem, length = struct.unpack_from("<HHL", raw, pos)
        pos += 8
        if length == 2:
            values[elem] = struct.unpack_from("<H", raw, pos)[0]
        pos += length
    return values


def _expect_abort(conn: socket.socket) -> bytes:
    pdu = ul.read_pdu(conn.makefile("rb"), 0)
    assert pdu.type == ul.A_ABORT
    return pdu.body


@pytest.mark.parametrize(
    "first",
    [
        pytest.param(struct.pack(">BxL", ul.P_DATA_TF, 6) + struct.pack(">LBB", 2, 1, 3), id="p-data-before-associate"),
        pytest.param(struct.pack(">BxL", 0x09, 4) + b"\x00" * 4, id="unknown-pdu-type"),
        pytest.param(struct.pack(">BxL", ul.A_ASSOCIATE_RQ, ul.MAX_ASSOCIATE_RQ_BYTES + 1), id="oversized-request"),
        pytest.param(struct.pack(">BxL", ul.A_ASSOCIATE_RQ, 10) + b"\x00\x01" + b"\xff" * 8, id="garbage-request"),
    ],
)
def test_protocol_errors_before_association_abort(acceptor: AssociationAcceptor, first: bytes) -> None:
    with socket.create_connection(acceptor.address, timeout=5) as conn:
        conn.sendall(first)
        _expect_abort(conn)
    assert acceptor.active_associations() == 0


def test_protocol_errors_inside_association_abort(acceptor: AssociationAcceptor, recorder: Recorder) -> None:
    cases = [
        ul.p_data(3, b"\x00" * 8, is_command=True, max_pdu=0),  # context 3 was never proposed
        struct.pack(">BxL", ul.P_DATA_TF, 20000) + b"\x00" * 20000,  # over our 16384 maximum
        ul.p_data(1, b"\x00" * 8, is_command=False, max_pdu=0),  # a data set without its command
        ul.p_data(1, b"\x01\x00", is_command=True, max_pdu=0),  # a truncated command set
        _associate_rq([(1, Verification)]),  # a second A-ASSOCIATE-RQ
    ]
    for case in cases:
        with _raw_association(acceptor, [(1, Verification)]) as conn:
            conn.sendall(case)
            body = _expect_abort(conn)
            assert body[2] == ul.ABORT_SOURCE_PROVIDER
    assert recorder.requests == []


def test_idle_association_times_out(recorder: Recorder) -> None:
    acceptor = _start(recorder, network_timeout=0.3)
    try:
        with _raw_association(acceptor, [(1, Verification)]) as conn:
            _expect_abort(conn)  # nothing sent for longer than network_timeout
    finally:
        acceptor.stop(1)


def test_store_fragmented_command_and_data_over_raw_pdus(acceptor: AssociationAcceptor, recorder: Recorder) -> None:
    ct = _ct()
    data = encode(ct, True, True)  # implicit VR little endian, as the context's transfer syntax
    command = _command(0x0001, message_id=3, sop_class=ct.SOPClassUID, has_data_set=True, sop_instance=ct.SOPInstanceUID)
    with _raw_association(acceptor, [(1, CTImageStorage)]) as conn:
        # the command split over two PDVs in two PDUs, the data set over 1000-byte PDVs
        half = len(command) // 2
        conn.sendall(struct.pack(">BxL", ul.P_DATA_TF, 6 + half) + struct.pack(">LBB", half + 2, 1, 0x01) + command[:half])
        conn.sendall(ul.p_data(1, command[half:], is_command=True, max_pdu=0))
        conn.sendall(ul.p_data(1, data, is_command=False, max_pdu=1006))
        response = _read_response(conn)
    assert response[0x0900] == STATUS_SUCCESS and response[0x0120] == 3
    (request,) = recorder.requests
    assert request.data_set == data


# --------------------------------------------------------------------------- codecs


def test_response_command_set_reads_back_with_pydicom() -> None:
    request = Command(0x0001, 42, True, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5")
    raw = encode_response(request, 0xC001, "bad UID \\ here")
    ds = read_dataset(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(raw) - 12
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == 42
    assert ds.CommandDataSetType == 0x0101
    assert ds.Status == 0xC001
    assert ds.ErrorComment == "bad UID / here"
    assert ds.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.AffectedSOPInstanceUID == "1.2.3.4.5"
    assert decode_command(_command(0x0030, message_id=9, sop_class="1.2.840.10008.1.1", has_data_set=False)) == Command(
        0x0030, 9, False, "1.2.840.10008.1.1", None
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00\x00\x01",  # truncated element header
        struct.pack("<HHL", 0x0008, 0x0016, 2) + b"1\x00",  # not the command group
        struct.pack("<HHL", 0, 0x0100, 100) + b"\x00\x00",  # value runs past the end
        struct.pack("<HHL", 0, 0x0110, 2) + b"\x01\x00",  # no Command Field
    ],
)
def test_malformed_command_sets(raw: bytes) -> None:
    with pytest.raises(CommandError):
        decode_command(raw)


def test_p_data_split_respects_peer_maximum() -> None:
    payload = bytes(range(256)) * 40
    stream = BytesIO(ul.p_data(5, payload, is_command=False, max_pdu=1000))
    parts = []
    while True:
        try:
            pdu = ul.read_pdu(stream, 1000)
        except ul.PeerClosed:
            break
        (pdv,) = list(ul.iter_pdvs(pdu.body))
        parts.append(pdv)
    assert all(p.context_id == 5 and not p.is_command for p in parts)
    assert [p.is_last for p in parts] == [False] * (len(parts) - 1) + [True]
    assert b"".join(bytes(p.fragment) for p in parts) == payload


def test_connections_without_request_are_bounded(recorder: Recorder) -> None:
    acceptor = _start(recorder, max_associations=1, acse_timeout=30.0)
    held: list[socket.socket] = []
    try:
        for _ in range(64):  # max(64, 4 x max_associations) connections may wait for their request
            held.append(socket.create_connection(acceptor.address, timeout=5))
        deadline = time.monotonic() + 5
        while len(acceptor._open) < 64 and time.monotonic() < deadline:
            time.sleep(0.02)
        extra = socket.create_connection(acceptor.address, timeout=5)
        assert extra.recv(16) == b""  # closed at once, no thread waits 30 s for it
        extra.close()
        # the waiting ones are still served once they send their request
        held[0].sendall(_associate_rq([(1, Verification)]))
        assert _read_pdu_type(held[0]) == ul.A_ASSOCIATE_AC
    finally:
        for conn in held:
            conn.close()
        acceptor.stop(1)


# --------------------------------------------------------------------------- protocol fuzz

_pdu_bytes = st.one_of(
    # a well-framed PDU of any type with a random body
    st.builds(
        lambda t, body: struct.pack(">BxL", t, len(body)) + body,
        st.integers(0, 255),
        st.binary(max_size=64),
    ),
    # P-DATA with random PDV items on the accepted context or another one
    st.builds(
        lambda items: struct.pack(">BxL", ul.P_DATA_TF, sum(len(i) for i in items)) + b"".join(items),
        st.lists(
            st.builds(
                lambda ctx, control, payload: struct.pack(">LBB", len(payload) + 2, ctx, control) + payload,
                st.sampled_from([1, 3, 255]),
                st.integers(0, 255),
                st.binary(max_size=48),
            ),
            max_size=3,
        ),
    ),
    # a header that lies about its length, then the connection ends
    st.builds(lambda n: struct.pack(">BxL", ul.P_DATA_TF, n), st.integers(1, 1 << 31)),
    st.binary(min_size=1, max_size=32),
)


def test_random_pdus_never_break_the_acceptor(recorder: Recorder) -> None:
    """After a valid association, any sequence of random PDUs ends in a response, an
    A-ABORT or a closed connection within the timeouts, and the acceptor keeps serving."""
    acceptor = _start(recorder, network_timeout=1.0, dimse_timeout=1.0)

    @settings(max_examples=int(os.environ.get("DSKI_FUZZ_EXAMPLES", "150")), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(_pdu_bytes, min_size=1, max_size=4))
    def case(pdus: list[bytes]) -> None:
        with _raw_association(acceptor, [(1, Verification)]) as conn:
            conn.settimeout(5)
            try:
                for pdu in pdus:
                    conn.sendall(pdu)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(65536):  # responses, then an A-ABORT, A-RELEASE-RP or the close
                    pass
            except TimeoutError:
                pytest.fail(f"no end within 5 s after {pdus!r}")
            except OSError:
                pass  # the acceptor closed first (reset, broken pipe, not connected): also an end

    try:
        case()
        host, port = acceptor.address
        assoc = _scu().associate(host, port, ae_title=AET)
        assert assoc.is_established and assoc.send_c_echo().Status == STATUS_SUCCESS
        assoc.release()
        deadline = time.monotonic() + 5
        while acceptor.active_associations() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert acceptor.active_associations() == 0
    finally:
        acceptor.stop(1)
