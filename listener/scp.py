"""The node's DICOM listener: C-ECHO and C-STORE for every storage SOP class.

Durable acknowledgement: the C-STORE handler runs in the association's thread and
returns its status only after

1. the encoded bytes exactly as received (plus a File Meta header) are in the spool:
   temporary name, fsync, atomic rename, folder fsync (``storage.spool.Spool.store``);
2. the ``instances`` row pointing at that file is committed
   (``storage.repository.Repository.record_received_batch``). Concurrent associations
   share commits (``storage.batching.GroupCommit``): a handler waits for the commit
   of the batch that holds its row, so each still answers only after its own row is
   durable, and a failed batch commit fails every handler in it (0xA700 when the
   database is unavailable; its spool file is removed as for a single store).

pynetdicom sends the C-STORE response only when the handler returns, so a crash at
any point before step 2 completes leaves the sender without a success status (it
will send again) and at worst an orphan spool file that start-up reconciliation
adopts or quarantines. The dataset is never decoded here: only a few header
elements are parsed from the bytes, and the pixel data is not touched.

Rejected objects (not parseable, missing or malformed UIDs, over the pixel limit)
get a failure status and are NOT kept: the sender still holds them and owns the
retry or the alarm, and keeping unacknowledged bytes from a faulty or hostile peer
would let it fill the disk. The log line names the calling AE, the size, the
sha256 and the reason, which is what an auditor needs to find the object at the
sender.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    evt,
)
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    StoragePresentationContexts,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from listener.classify import Classification, classify
from listener.config import ListenerConfig, NodeConfig, ReportConfig
from listener.dimse import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SOP_CLASS_MISMATCH,
    STATUS_SUCCESS,
    STATUS_UID_MISMATCH,
)
from listener.header import InvalidObjectError, file_meta_bytes, parse_header, valid_uid
from storage.batching import GroupCommit
from storage.errors import DatabaseUnavailableError, SpoolError, SpoolFullError
from storage.repository import ReceivedObject, ReceiveResult

logger = logging.getLogger(__name__)
def encoded_with_meta(event: evt.Event) -> bytes:
    """The C-STORE data set as received, behind a File Meta header (as ``event.encoded_dataset()``).

    The header is built directly when the request's UIDs are clean UIDs; anything else
    (padding, odd characters from a faulty peer) goes through pynetdicom as before.
    """
    request = event.request
    uids = (str(request.AffectedSOPClassUID or ""), str(request.AffectedSOPInstanceUID or ""),
            str(event.context.transfer_syntax or ""))
    if all(valid_uid(u) == u for u in uids):
        return file_meta_bytes(*uids) + event.encoded_dataset(include_meta=False)
    return event.encoded_dataset(include_meta=True)


# --------------------------------------------------------------------------- storage seam


class SpoolLike(Protocol):
    def store(self, data: bytes) -> Any: ...

    def delete(self, path: Any) -> bool: ...


class RepositoryLike(Protocol):
    def record_received(self, **kwargs: Any) -> Any: ...


def _item_failure(exc: BaseException) -> bool:
    """A batch failure that one object can cause (not the database being unavailable)."""
    return not isinstance(exc, DatabaseUnavailableError)


def _receive_committer(repo: RepositoryLike) -> Callable[[ReceivedObject], ReceiveResult]:
    """How the handler records one object: through a group commit where the repository can
    record a batch in one transaction (``Repository.record_received_batch``), else one
    ``record_received`` call per object (e.g. a wrapper in tests)."""
    batch = getattr(repo, "record_received_batch", None)
    if callable(batch):
        return GroupCommit(batch, isolate_failures=_item_failure).submit
    return lambda obj: repo.record_received(**{f.name: getattr(obj, f.name) for f in fields(ReceivedObject)})


def _status(code: int, comment: str) -> Dataset:
    """A status dataset with an Error Comment (LO: at most 64 characters) for the sender's log."""
    rsp = Dataset()
    rsp.Status = code
    if code != STATUS_SUCCESS and comment:
        rsp.ErrorComment = comment.replace("\\", "/")[:64]
    return rsp


class StoreHandler:
    """The C-STORE handler. Holds only immutable references, so pynetdicom may call
    it from many association threads at once; Spool and Repository are thread-safe."""

    def __init__(
        self,
        spool: SpoolLike,
        repo: RepositoryLike,
        *,
        max_pixels: int,
        report_cfg: ReportConfig,
        on_stored: Callable[[], None] | None = None,
    ) -> None:
        self._spool = spool
        self._max_pixels = max_pixels
        self._report_cfg = report_cfg
        self._on_stored = on_stored  # e.g. wake the workers; called after the commit
        # concurrent associations share one database commit (storage.batching.GroupCommit)
        self._record = _receive_committer(repo)

    def __call__(self, event: evt.Event) -> Dataset:
        calling_ae = str(event.assoc.requestor.ae_title or "").strip()
        peer = f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"
        try:
            data = encoded_with_meta(event)
        except Exception as exc:  # pragma: no cover - pynetdicom hands us a request without a data set
            logger.error("C-STORE without a data set", extra={"calling_ae": calling_ae, "error": str(exc)})
            return _status(STATUS_CANNOT_UNDERSTAND, "no data set")
        try:
            return self._store(event, data, calling_ae, peer)
        except Exception as exc:  # a bug must cost one store, never the association thread
            logger.exception("C-STORE handler failed", extra={"calling_ae": calling_ae, "peer": peer})
            return _status(STATUS_PROCESSING_FAILURE, f"processing failure: {type(exc).__name__}")

    def _store(self, event: evt.Event, data: bytes, calling_ae: str, peer: str) -> Dataset:
        try:
            header = parse_header(data, max_pixels=self._max_pixels)
            command_sop_instance = valid_uid(event.request.AffectedSOPInstanceUID)
            command_sop_class = valid_uid(event.request.AffectedSOPClassUID)
            if command_sop_class and command_sop_class != header.sop_class_uid:
                raise InvalidObjectError(
                    STATUS_SOP_CLASS_MISMATCH,
                    f"data set SOP class {header.sop_class_uid} differs from the request's {command_sop_class}",
                )
            if command_sop_instance and command_sop_instance != header.sop_instance_uid:
                raise InvalidObjectError(
                    STATUS_UID_MISMATCH,
                    f"data set SOP instance {header.sop_instance_uid} differs from the request's {command_sop_instance}",
                )
        except InvalidObjectError as exc:
            logger.warning(
                "refused object",
                extra={
                    "calling_ae": calling_ae,
                    "peer": peer,
                    "status": f"0x{exc.status:04X}",
                    "reason": exc.reason,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                },
            )
            return _status(exc.status, exc.reason)

        classification: Classification = classify(header.dataset, self._report_cfg)

        try:
            entry = self._spool.store(data)
        except SpoolFullError as exc:
            logger.error("spool full, store refused", extra={"calling_ae": calling_ae, "reason": str(exc)})
            return _status(STATUS_OUT_OF_RESOURCES, "out of resources: spool full")
        except SpoolError as exc:
            logger.error("spool write failed, store refused", extra={"calling_ae": calling_ae, "reason": str(exc)})
            return _status(STATUS_OUT_OF_RESOURCES, "out of resources: spool write failed")

        try:
            result = self._record(ReceivedObject(
                sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid,
                study_instance_uid=header.study_instance_uid,
                series_instance_uid=header.series_instance_uid,
                patient_id=header.patient_id,
                modality=header.modality,
                transfer_syntax_uid=header.transfer_syntax_uid,
                calling_ae=calling_ae,
                peer_address=peer,
                spool_path=str(entry.path),
                sha256=entry.sha256,
                size_bytes=entry.size,
                status="received" if classification.analyse else "skipped",
                reason=None if classification.analyse else classification.reason,
            ))
        except DatabaseUnavailableError as exc:
            self._discard(entry.path)
            logger.error("database unavailable, store refused", extra={"calling_ae": calling_ae, "reason": str(exc)})
            return _status(STATUS_OUT_OF_RESOURCES, "out of resources: database unavailable")
        except BaseException:
            self._discard(entry.path)
            raise

        if result.duplicate:
            # same SOP Instance UID and same bytes: already held, the new copy is redundant
            self._discard(entry.path)
        elif classification.analyse and self._on_stored is not None:
            try:
                self._on_stored()
            except Exception:  # committed: the status must be success whatever a listener does
                logger.exception("on_stored callback failed")
        logger.info(
            "stored instance",
            extra={
                "sop_instance_uid": header.sop_instance_uid,
                "series_instance_uid": header.series_instance_uid,
                "instance_id": result.instance_id,
                "duplicate": result.duplicate,
                "kind": classification.kind,
                "calling_ae": calling_ae,
            },
        )
        return _status(STATUS_SUCCESS, "")

    def _discard(self, path: Any) -> None:
        try:
            self._spool.delete(path)
        except Exception as exc:  # reconciliation quarantines what is left
            logger.error("cannot remove spool file", extra={"path": str(path), "error": str(exc)})


# --------------------------------------------------------------------------- association policy


class AssociationPolicy:
    """Calling-AE allow-list with optional host binding, checked when the request arrives.

    Runs as an EVT_REQUESTED handler: pynetdicom lets it send the A-ASSOCIATE-RJ
    itself, with "calling AE title not recognised" (permanent, service user, 3) for
    an unknown title and for a known title from the wrong address.
    """

    def __init__(self, cfg: ListenerConfig, resolve: Callable[[str], set[str]] | None = None) -> None:
        self._required = cfg.require_known_calling_ae
        resolve = resolve or _resolve_host
        allowed: dict[str, set[str] | None] = {}
        for entry in cfg.calling_aes:
            if entry.host is None:
                allowed[entry.ae_title] = None  # an entry without host: any address
            elif entry.ae_title not in allowed or allowed[entry.ae_title] is not None:
                allowed[entry.ae_title] = (allowed.get(entry.ae_title) or set()) | resolve(entry.host)
        self._allowed = allowed

    def permits(self, calling_ae: str, address: str) -> bool:
        if not self._required:
            return True
        title = calling_ae.strip()
        if title not in self._allowed:
            return False
        hosts = self._allowed[title]
        return hosts is None or _normalise_address(address) in hosts

    def __call__(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title or "").strip()
        address = str(assoc.requestor.address)
        try:
            allowed = self.permits(calling, address)
        except Exception:  # an error here must not let the association through
            logger.exception("association policy failed", extra={"calling_ae": calling, "peer": address})
            allowed = False
        if allowed:
            return
        logger.warning("association rejected: calling AE not recognised", extra={"calling_ae": calling, "peer": address})
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        assoc.kill()


def _normalise_address(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def _resolve_host(host: str) -> set[str]:
    """Addresses of a configured host (an IP address or a name, resolved once at start-up)."""
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        raise ValueError(f"listener.calling_aes: cannot resolve host {host!r}: {exc}") from exc
    return {_normalise_address(str(info[4][0])) for info in infos}


# --------------------------------------------------------------------------- the AE


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pynetdicom knows, current and retired."""
    uids = {cx.abstract_syntax for cx in AllStoragePresentationContexts}
    uids |= {cx.abstract_syntax for cx in StoragePresentationContexts}
    return sorted(str(u) for u in uids if u)


def _server_ssl_context(cfg: ListenerConfig) -> ssl.SSLContext | None:
    tls = cfg.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=str(tls.ca_certificates))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else (
        ssl.CERT_OPTIONAL if tls.ca_certificates is not None else ssl.CERT_NONE
    )
    return context


def set_poll_interval(assoc: Any, seconds: float) -> None:
    """Set how long the association's DUL thread sleeps between socket polls when idle.

    pynetdicom 3.0 has no public setting for it: ``DULServiceProvider._run_loop_delay``
    (1 ms) is a private attribute, read on every loop. A store's request waits for up
    to one such sleep before it is read, and its response for up to another before it
    is sent, so at 1 ms it bounds one association to a few hundred stores per second.
    Guarded, so that a pynetdicom without the attribute keeps its own default.
    """
    dul = getattr(assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = seconds


def association_tuning(cfg: ListenerConfig) -> tuple[Any, Callable[[evt.Event], None]]:
    """The (event, handler) pair that applies ``cfg.poll_interval_seconds`` to every new association."""

    def on_open(event: evt.Event) -> None:
        set_poll_interval(event.assoc, cfg.poll_interval_seconds)

    return evt.EVT_CONN_OPEN, on_open


def build_ae(cfg: ListenerConfig) -> AE:
    ae = AE(ae_title=cfg.ae_title)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for uid in storage_sop_classes():
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    # pynetdicom's own check stays as a second line behind AssociationPolicy
    if cfg.require_known_calling_ae and cfg.calling_aes:
        ae.require_calling_aet = sorted({c.ae_title for c in cfg.calling_aes})
    ae.require_called_aet = cfg.require_called_ae_title
    ae.maximum_associations = cfg.max_associations
    ae.acse_timeout = cfg.acse_timeout_seconds
    ae.dimse_timeout = cfg.dimse_timeout_seconds
    ae.network_timeout = cfg.network_timeout_seconds
    ae.maximum_pdu_size = cfg.max_pdu_bytes
    return ae


class StorageSCP:
    """The listening AE: ``start()`` returns once the port is bound; ``stop()`` drains."""

    def __init__(
        self, cfg: NodeConfig, spool: SpoolLike, repo: RepositoryLike, *, on_stored: Callable[[], None] | None = None
    ) -> None:
        self._cfg = cfg.listener
        self._policy = AssociationPolicy(cfg.listener)
        self._handler = StoreHandler(
            spool, repo, max_pixels=cfg.listener.max_pixels, report_cfg=cfg.report, on_stored=on_stored
        )
        self._ae = build_ae(cfg.listener)
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("the listener is not running")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self, extra_handlers: Sequence[tuple[Any, Callable[..., Any]]] = ()) -> None:
        """Bind and serve in pynetdicom's threads; ``extra_handlers`` are (event, handler) pairs
        bound as well (notification events: observers, e.g. in tests)."""
        with self._lock:
            if self._server is not None:
                return
            handlers = [
                (evt.EVT_REQUESTED, self._policy),
                (evt.EVT_C_ECHO, _handle_echo),
                (evt.EVT_C_STORE, self._handler),
                association_tuning(self._cfg),
                *extra_handlers,
            ]
            self._server = self._ae.start_server(
                (self._cfg.host, self._cfg.port),
                block=False,
                evt_handlers=handlers,
                ssl_context=_server_ssl_context(self._cfg),
            )
        logger.info(
            "listening",
            extra={"ae_title": self._cfg.ae_title, "host": self._cfg.host, "port": self.address[1]},
        )

    def active_associations(self) -> int:
        return len([a for a in self._ae.active_associations if a.is_acceptor])

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop accepting associations, let open ones finish (up to the grace period), then abort the rest.

        A store whose handler is running when the association is aborted still
        completes its write and commit; only its response is lost, so the sender
        re-sends and the copy is recognised as a duplicate.
        """
        grace = self._cfg.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        with self._lock:
            server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()  # closes the listening socket: no new association from here
        deadline = threading.Event()
        waited = 0.0
        while self.active_associations() and waited < grace:
            deadline.wait(0.1)
            waited += 0.1
        remaining = [a for a in self._ae.active_associations if a.is_acceptor]
        for assoc in remaining:
            logger.warning("aborting association at shutdown", extra={"calling_ae": assoc.requestor.ae_title})
            assoc.abort()
        logger.info("listener stopped", extra={"aborted": len(remaining)})


def _handle_echo(event: evt.Event) -> int:
    return STATUS_SUCCESS
