"""The association acceptor: a listening socket, one thread per association, blocking I/O.

Why not pynetdicom's server: each pynetdicom association runs two threads that hand
every PDU and DIMSE message to each other through queues polled with 1 ms sleeps;
with nothing else to do it answered 0.16-0.27 of dcmtk storescp's C-STOREs per second
on the development machine (docs/performance.md). Here the association's own thread
reads a PDU, runs the handler and writes the response, and the GIL is released in the
socket calls. pynetdicom still does what has variable structure and many rules:
decoding the A-ASSOCIATE-RQ, presentation context and role negotiation, and
encoding the A-ASSOCIATE-AC.

What is provided (PS3.8 9.2 state machine, acceptor side): A-ASSOCIATE accept or
reject (calling and called AE title, association limit, application context),
P-DATA with any fragmentation, A-RELEASE, A-ABORT both ways, the ACSE timeout until
the request arrives, the network timeout while idle and the DIMSE timeout inside a
message. Requests other than C-ECHO and C-STORE get status 0x0211 (unrecognised
operation). Extended negotiation (asynchronous operations, user identity, SOP class
extended) is not answered, which PS3.7 D.3.3 lets an acceptor do: the defaults apply.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC as AssociateAcPDU
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRqPDU
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from listener import upper_layer as ul
from listener.association_count import SharedAssociationCount
from listener.dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    STATUS_SUCCESS,
    STATUS_UNRECOGNISED_OPERATION,
    Command,
    CommandError,
    decode_command,
    encode_response,
)

logger = logging.getLogger(__name__)

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
_READ_BUFFER = 256 * 1024
# how long a rejected requestor may take to close the transport before we do
_ARTIM_AFTER_REJECT_SECONDS = 2.0


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of an association."""

    calling_ae: str
    called_ae: str
    address: str
    port: int

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class StoreRequest:
    """One complete C-STORE request: its command and its data set exactly as received."""

    peer: Peer
    command: Command
    transfer_syntax_uid: str
    data_set: bytes


@dataclass(frozen=True)
class Status:
    code: int
    comment: str = ""


@dataclass(frozen=True)
class AcceptorSettings:
    ae_title: str
    require_called_ae_title: bool
    max_associations: int
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    max_pdu_bytes: int  # what we accept per PDU (0: no limit)


@dataclass(frozen=True)
class AcceptorCallbacks:
    """What the acceptor asks the node: is this peer allowed, and store this object."""

    permits: Callable[[str, str], bool]  # (calling AE title, peer address)
    store: Callable[[StoreRequest], Status]
    on_response: Callable[[Command, Status], None] | None = None  # observes each response before it is sent


class _Aborted(Exception):
    """The association is over: released, rejected or aborted, and already answered."""


class _MessageAssembler:
    """Puts DIMSE messages together from presentation data values (PS3.8 9.3.5, PS3.7 E.2):
    a command, then its data set when it has one, each in fragments on one context."""

    def __init__(self, contexts: dict[int, PresentationContext]) -> None:
        self._contexts = contexts
        self._command_parts: list[memoryview] = []
        self._data_parts: list[memoryview] = []
        self._pending: tuple[int, Command] | None = None  # a command whose data set is arriving

    @property
    def inside(self) -> bool:
        """A message has started and is not complete."""
        return self._pending is not None or bool(self._command_parts)

    def add(self, pdv: ul.PDV) -> tuple[int, PresentationContext, Command, bytes] | None:
        """The complete message (context ID, context, command, data set) this PDV ends, if any."""
        context = self._contexts.get(pdv.context_id)
        if context is None:
            raise ul.ProtocolError(ul.ABORT_INVALID_PARAMETER, f"presentation context {pdv.context_id} was not accepted")
        if pdv.is_command:
            if self._pending is not None:
                raise ul.ProtocolError(ul.ABORT_UNEXPECTED_PARAMETER, "command fragment inside a data set")
            self._command_parts.append(pdv.fragment)
            if not pdv.is_last:
                return None
            try:
                command = decode_command(b"".join(self._command_parts))
            except CommandError as exc:
                raise ul.ProtocolError(ul.ABORT_INVALID_PARAMETER, f"command set: {exc}") from exc
            self._command_parts.clear()
            if command.has_data_set:
                self._pending = (pdv.context_id, command)
                return None
            return pdv.context_id, context, command, b""
        if self._pending is None or self._pending[0] != pdv.context_id:
            raise ul.ProtocolError(ul.ABORT_UNEXPECTED_PARAMETER, "data set fragment without its command")
        self._data_parts.append(pdv.fragment)
        if not pdv.is_last:
            return None
        context_id, command = self._pending
        self._pending = None
        data = b"".join(self._data_parts)
        self._data_parts.clear()
        return context_id, context, command, data


class _Association:
    """One accepted connection, driven by its own thread from request to release or abort."""

    def __init__(
        self,
        acceptor: AssociationAcceptor,
        conn: socket.socket,
        address: tuple[Any, ...],
    ) -> None:
        self._acceptor = acceptor
        self._settings = acceptor.settings
        self._conn = conn
        self._address = str(address[0])
        self._port = int(address[1])
        self._send_lock = threading.Lock()
        self._closed = False
        self.peer: Peer | None = None
        self.stores = 0

    # -- transport ---------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self._conn.sendall(data)

    def abort(self, reason: int = ul.ABORT_NOT_SPECIFIED, source: int = ul.ABORT_SOURCE_PROVIDER) -> None:
        """Send an A-ABORT (best effort) and end the transport; the reader thread then ends."""
        try:
            self._send(ul.abort(reason, source))
        except OSError:
            pass
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._conn.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()

    # -- life cycle ----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except ul.PeerClosed as exc:
            logger.info("association transport closed", extra={**self._fields(), "detail": str(exc)})
        except ul.ProtocolError as exc:
            logger.warning("association aborted: protocol error", extra={**self._fields(), "reason": str(exc)})
            self.abort(exc.reason)
        except TimeoutError:
            logger.warning("association aborted: timeout", extra=self._fields())
            self.abort(ul.ABORT_NOT_SPECIFIED)
        except _Aborted:
            pass
        except (OSError, ssl.SSLError) as exc:
            if not self._closed:
                logger.warning("association transport failed", extra={**self._fields(), "error": str(exc)})
        except Exception:  # a bug must cost this association, never the listener
            logger.exception("association failed", extra=self._fields())
            self.abort(ul.ABORT_NOT_SPECIFIED)
        finally:
            self._close()
            self._acceptor._finished(self)

    def _fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"peer": f"{self._address}:{self._port}", "stores": self.stores}
        if self.peer is not None:
            fields["calling_ae"] = self.peer.calling_ae
        return fields

    def _run(self) -> None:
        settings = self._settings
        self._conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn.settimeout(settings.acse_timeout)
        if self._acceptor.ssl_context is not None:
            self._conn = self._acceptor.ssl_context.wrap_socket(self._conn, server_side=True)
        stream = self._conn.makefile("rb", buffering=_READ_BUFFER)
        try:
            try:
                first = ul.read_pdu(stream, ul.MAX_ASSOCIATE_RQ_BYTES)
            except TimeoutError:
                # ARTIM expired before any request: close the transport, no A-ABORT (PS3.8 9.2, AA-2)
                logger.warning("connection closed: no association request", extra=self._fields())
                raise _Aborted from None
            if first.type != ul.A_ASSOCIATE_RQ:
                raise ul.ProtocolError(ul.ABORT_UNEXPECTED_PDU, f"PDU type 0x{first.type:02X} before A-ASSOCIATE-RQ")
            contexts, peer_max_pdu = self._negotiate(first)
            self._serve(stream, contexts, peer_max_pdu)
        finally:
            stream.close()

    # -- association establishment ------------------------------------------------------

    def _negotiate(self, pdu: ul.PDU) -> tuple[dict[int, PresentationContext], int]:
        settings = self._settings
        request = AssociateRqPDU()
        try:
            request.decode(pdu.raw())
            primitive = request.to_primitive()
        except Exception as exc:  # pynetdicom raises assorted errors on malformed items
            raise ul.ProtocolError(ul.ABORT_INVALID_PARAMETER, f"malformed A-ASSOCIATE-RQ: {exc}") from exc
        calling = str(primitive.calling_ae_title or "").strip()
        called = str(primitive.called_ae_title or "").strip()
        self.peer = Peer(calling, called, self._address, self._port)

        reject: tuple[int, int, int] | None = None
        why = ""
        if request.protocol_version != 0x0001:
            reject, why = ul.REJECT_PROTOCOL_VERSION, f"protocol version {request.protocol_version}"
        elif str(primitive.application_context_name) != APPLICATION_CONTEXT_NAME:
            reject, why = ul.REJECT_APPLICATION_CONTEXT, f"application context {primitive.application_context_name}"
        elif settings.require_called_ae_title and called != settings.ae_title:
            reject, why = ul.REJECT_CALLED_AE, f"called AE title {called!r} is not {settings.ae_title!r}"
        elif not self._permitted(calling):
            reject, why = ul.REJECT_CALLING_AE, "calling AE not recognised"
        elif not self._acceptor._admit(self):
            reject, why = ul.REJECT_LOCAL_LIMIT, f"{settings.max_associations} associations already open"
        if reject is not None:
            logger.warning("association rejected", extra={**self._fields(), "reason": why})
            self._send(ul.associate_rj(*reject))
            self._await_peer_close()
            raise _Aborted

        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in primitive.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
        }
        results, role_items = negotiate_as_acceptor(
            primitive.presentation_context_definition_list, self._acceptor.contexts, roles or None
        )
        accepted = {int(cx.context_id): cx for cx in results if cx.result == 0x00}
        peer_max_pdu = next(
            (int(item.maximum_length_received or 0) for item in primitive.user_information
             if isinstance(item, MaximumLengthNotification)),
            0,
        )

        response = A_ASSOCIATE()
        response.application_context_name = APPLICATION_CONTEXT_NAME
        response.calling_ae_title = primitive.calling_ae_title
        response.called_ae_title = primitive.called_ae_title
        response.result = 0x00
        response.result_source = 0x01
        response.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = settings.max_pdu_bytes
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        response.user_information = [max_length, class_uid, version, *role_items]
        accept = AssociateAcPDU()
        accept.from_primitive(response)
        self._send(accept.encode())
        logger.info(
            "association accepted",
            extra={**self._fields(), "contexts": len(accepted), "rejected_contexts": len(results) - len(accepted)},
        )
        return accepted, peer_max_pdu

    def _await_peer_close(self) -> None:
        """After an A-ASSOCIATE-RJ the requestor closes the transport (PS3.8 9.2: Sta13, under
        the ARTIM timer). Closing it first races the requestor's reading of the RJ: pynetdicom
        then at times reports an abort instead of the rejection (seen in tests under load)."""
        try:
            self._conn.settimeout(min(self._settings.acse_timeout, _ARTIM_AFTER_REJECT_SECONDS))
            while self._conn.recv(4096):
                pass  # nothing after a rejection means anything
        except (OSError, ssl.SSLError):  # the timer ran out (TimeoutError), or the peer reset
            pass

    def _permitted(self, calling: str) -> bool:
        try:
            return bool(self._acceptor.callbacks.permits(calling, self._address))
        except Exception:  # an error here must not let the association through
            logger.exception("association policy failed", extra=self._fields())
            return False

    # -- data transfer -------------------------------------------------------------------

    def _serve(self, stream: Any, contexts: dict[int, PresentationContext], peer_max_pdu: int) -> None:
        settings = self._settings
        messages = _MessageAssembler(contexts)
        self._conn.settimeout(settings.network_timeout)
        while True:
            pdu = ul.read_pdu(stream, settings.max_pdu_bytes)
            if pdu.type == ul.P_DATA_TF:
                for pdv in ul.iter_pdvs(pdu.body):
                    message = messages.add(pdv)
                    if message is not None:
                        self._dispatch(*message, peer_max_pdu)
                # inside a message the DIMSE timeout applies, between messages the network one
                self._conn.settimeout(settings.dimse_timeout if messages.inside else settings.network_timeout)
            elif pdu.type == ul.A_RELEASE_RQ:
                self._send(ul.release_rp())
                logger.info("association released", extra=self._fields())
                raise _Aborted
            elif pdu.type == ul.A_ABORT:
                logger.info("association aborted by the peer", extra=self._fields())
                raise _Aborted
            else:
                raise ul.ProtocolError(ul.ABORT_UNEXPECTED_PDU, f"unexpected PDU type 0x{pdu.type:02X}")

    def _dispatch(
        self, context_id: int, context: PresentationContext, command: Command, data: bytes, peer_max_pdu: int
    ) -> None:
        if not command.is_request or command.command_field == C_CANCEL_RQ:
            return  # nothing to answer: a stray response, or a cancel of nothing we run asynchronously
        if command.command_field == C_ECHO_RQ:
            status = Status(STATUS_SUCCESS)
        elif command.command_field == C_STORE_RQ and command.has_data_set:
            assert self.peer is not None
            status = self._acceptor.callbacks.store(StoreRequest(
                peer=self.peer,
                command=command,
                transfer_syntax_uid=str(context.transfer_syntax[0]),
                data_set=data,
            ))
            self.stores += 1
        else:
            status = Status(STATUS_UNRECOGNISED_OPERATION, f"command 0x{command.command_field:04X} not provided")
        if self._acceptor.callbacks.on_response is not None:
            self._acceptor.callbacks.on_response(command, status)
        response = encode_response(command, status.code, status.comment)
        self._send(ul.p_data(context_id, response, is_command=True, max_pdu=peer_max_pdu))


def listening_socket(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A TCP socket bound to (host, port) and listening. Without SO_REUSEPORT: a second
    node started on the same port by mistake fails here instead of sharing the traffic."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class AssociationAcceptor:
    """Accepts connections on a listening socket and runs each association in its own thread."""

    def __init__(
        self,
        settings: AcceptorSettings,
        contexts: Sequence[PresentationContext],
        callbacks: AcceptorCallbacks,
        *,
        ssl_context: ssl.SSLContext | None = None,
        shared_count: SharedAssociationCount | None = None,
    ) -> None:
        """``shared_count``: where several processes serve one listening socket, the
        associations of all of them against ``settings.max_associations``."""
        self.settings = settings
        self.contexts = list(contexts)
        self.callbacks = callbacks
        self.ssl_context = ssl_context
        self.shared_count = shared_count
        self._lock = threading.Lock()
        self._open: set[_Association] = set()
        self._established: set[_Association] = set()
        self._idle = threading.Condition(self._lock)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None
        # open connections, established or still before their request (ACSE timeout)
        self._max_open = max(64, 4 * settings.max_associations)

    @property
    def address(self) -> tuple[str, int]:
        if self._socket is None:
            raise RuntimeError("the acceptor is not listening")
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    def start(self, listening: socket.socket) -> None:
        """Serve connections accepted on ``listening`` (see ``listening_socket``). Several
        processes may serve one listening socket: the kernel hands each connection to
        one of the processes waiting in accept()."""
        self._socket = listening
        self._thread = threading.Thread(target=self._accept_loop, args=(listening,), name="dicom-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, address = sock.accept()
            except OSError:
                return  # the listening socket was closed: stop()
            association = _Association(self, conn, address)
            with self._lock:
                crowded = len(self._open) >= self._max_open
                if not crowded:
                    self._open.add(association)
            if crowded:
                # connections that never send a request must not cost a thread each without end
                logger.warning("connection refused: too many open connections", extra={"peer": f"{address[0]}:{address[1]}"})
                conn.close()
                continue
            threading.Thread(target=association.run, name=f"dicom-assoc-{address[1]}", daemon=True).start()

    def _admit(self, association: _Association) -> bool:
        with self._lock:
            if len(self._established) >= self.settings.max_associations:
                return False
            if self.shared_count is not None and not self.shared_count.try_admit():
                return False
            self._established.add(association)
            return True

    def _finished(self, association: _Association) -> None:
        with self._lock:
            self._open.discard(association)
            if association in self._established:
                self._established.discard(association)
                if self.shared_count is not None:
                    self.shared_count.release()
            self._idle.notify_all()

    def active_associations(self) -> int:
        with self._lock:
            return len(self._established)

    def stop(self, grace_seconds: float) -> int:
        """Stop accepting; wait up to ``grace_seconds`` for open associations to end; abort the
        rest. Returns how many were aborted.

        The listening socket is shut down, not only closed: closing does not wake a thread
        blocked in accept(), and where several processes share the socket, a stop is a
        stop of all of them (``listener.receivers``)."""
        sock, self._socket = self._socket, None
        if sock is None:
            return 0
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._idle.wait_for(lambda: not self._open, timeout=grace_seconds)
            remaining = list(self._open)
        for association in remaining:
            logger.warning("aborting association at shutdown", extra=association._fields())
            association.abort(source=ul.ABORT_SOURCE_USER)
        with self._lock:
            self._idle.wait_for(lambda: not self._open, timeout=5)
        return len(remaining)
