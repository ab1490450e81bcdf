"""The node's DICOM listener: C-ECHO and C-STORE for every storage SOP class.

The network side is ``listener.acceptor`` (one thread per association); this module
holds what the node does with a C-STORE, the calling-AE policy and the listener's life
cycle.

Durable acknowledgement, by default: the handler returns success once the object and
its future row are in the receiver's write-ahead journal, fdatasynced
(``storage.journal``); the journal's thread writes the spool file and commits the row
within about 50 ms, and a start applies whatever a crash left before the port opens
(``storage.journal_apply``). Objects over a quarter of a journal segment, and every
object with ``storage.journal.enabled: false``, take the direct path: the handler
returns its status only after

1. the encoded bytes exactly as received (plus a File Meta header) are in the spool:
   temporary name, fsync, atomic rename, folder fsync (``storage.spool.Spool.store``);
2. the ``instances`` row pointing at that file is committed
   (``storage.repository.Repository.record_received_batch``). Concurrent associations
   share commits (``storage.batching.GroupCommit``): a handler waits for the commit
   of the batch that holds its row, so each still answers only after its own row is
   durable, and a failed batch commit fails every handler in it (0xA700 when the
   database is unavailable; its spool file is removed as for a single store).

The acceptor sends the C-STORE response only when the handler returns, so a crash at
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
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import FileMetaDataset
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
)
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    StoragePresentationContexts,
    build_context,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from listener.acceptor import (
    AcceptorCallbacks,
    AcceptorSettings,
    AssociationAcceptor,
    Status,
    StoreRequest,
    listening_socket,
)
from listener.association_count import SharedAssociationCount
from listener.classify import Classification, Classifier
from listener.config import ListenerConfig, NodeConfig, ReportConfig
from listener.dimse import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SOP_CLASS_MISMATCH,
    STATUS_SUCCESS,
    STATUS_UID_MISMATCH,
    Command,
)
from listener.header import (
    InvalidObjectError,
    ObjectHeader,
    file_meta_bytes,
    parse_header,
    valid_uid,
)
from storage.batching import GroupCommit
from storage.errors import DatabaseUnavailableError, SpoolError, SpoolFullError
from storage.journal_apply import JournaledStore, JournalSettings, journal_entry
from storage.repository import ReceivedObject, ReceiveResult, Repository
from storage.spool import Spool

logger = logging.getLogger(__name__)

JOURNALS_FOLDER = ".journal"  # under the spool root; a dot folder, never taken for spool objects


def encoded_with_meta(request: StoreRequest) -> bytes:
    """The C-STORE data set as received, behind a File Meta header.

    The header is built directly when the request's UIDs are clean UIDs; anything else
    (padding, odd characters from a faulty peer) goes through pydicom's writer, as
    pynetdicom's ``Event.encoded_dataset`` does.
    """
    command = request.command
    uids = (command.affected_sop_class_uid or "", command.affected_sop_instance_uid or "",
            request.transfer_syntax_uid)
    if all(valid_uid(u) == u for u in uids):
        return file_meta_bytes(*uids) + request.data_set
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = uids[0]
    meta.MediaStorageSOPInstanceUID = uids[1]
    meta.TransferSyntaxUID = uids[2]
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    return b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + request.data_set


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


def _receipt(header: ObjectHeader, classification: Classification, calling_ae: str, peer: str) -> dict[str, Any]:
    """The fields of a new ``instances`` row that come from the object and its sender,
    for the direct path's ``ReceivedObject`` and the journal's ``JournalEntry`` alike."""
    return {
        "sop_instance_uid": header.sop_instance_uid,
        "sop_class_uid": header.sop_class_uid,
        "study_instance_uid": header.study_instance_uid,
        "series_instance_uid": header.series_instance_uid,
        "patient_id": header.patient_id,
        "modality": header.modality,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "calling_ae": calling_ae,
        "peer_address": peer,
        "status": "received" if classification.analyse else "skipped",
        "reason": None if classification.analyse else classification.reason,
    }


def _spool_refusal(exc: SpoolError, calling_ae: str) -> Status:
    """Out of resources for an object the spool or the journal could not take."""
    what = "spool full" if isinstance(exc, SpoolFullError) else "spool write failed"
    logger.error(f"{what}, store refused", extra={"calling_ae": calling_ae, "reason": str(exc)})
    return _status(STATUS_OUT_OF_RESOURCES, f"out of resources: {what}")


def _status(code: int, comment: str) -> Status:
    """A status with an Error Comment (LO: at most 64 characters) for the sender's log."""
    return Status(code, comment.replace("\\", "/")[:64] if code != STATUS_SUCCESS else "")


class StoreHandler:
    """The C-STORE handler. Holds only immutable references, so the acceptor may call
    it from many association threads at once; Spool and Repository are thread-safe."""

    def __init__(
        self,
        spool: SpoolLike,
        repo: RepositoryLike,
        *,
        max_pixels: int,
        report_cfg: ReportConfig,
        on_stored: Callable[[], None] | None = None,
        journal: JournaledStore | None = None,
    ) -> None:
        self._spool = spool
        self._max_pixels = max_pixels
        self._classify = Classifier(report_cfg)
        self._on_stored = on_stored  # e.g. wake the workers; called after the commit
        # objects that fit go through the write-ahead journal (storage.journal_apply)
        self.journal = journal
        # concurrent associations share one database commit (storage.batching.GroupCommit)
        self._record = _receive_committer(repo)

    def __call__(self, request: StoreRequest) -> Status:
        calling_ae = request.peer.calling_ae
        peer = request.peer.endpoint
        try:
            data = encoded_with_meta(request)
            return self._store(request, data, calling_ae, peer)
        except Exception as exc:  # a bug must cost one store, never the association thread
            logger.exception("C-STORE handler failed", extra={"calling_ae": calling_ae, "peer": peer})
            return _status(STATUS_PROCESSING_FAILURE, f"processing failure: {type(exc).__name__}")

    def _store(self, request: StoreRequest, data: bytes, calling_ae: str, peer: str) -> Status:
        try:
            header = parse_header(data, max_pixels=self._max_pixels)
            command_sop_instance = valid_uid(request.command.affected_sop_instance_uid)
            command_sop_class = valid_uid(request.command.affected_sop_class_uid)
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

        classification: Classification = self._classify(header.dataset)
        journal = self.journal
        if journal is not None and journal.fits(len(data)):
            return self._store_journaled(journal, header, classification, data, calling_ae, peer)

        try:
            entry = self._spool.store(data)
        except SpoolError as exc:
            return _spool_refusal(exc, calling_ae)

        try:
            result = self._record(ReceivedObject(
                **_receipt(header, classification, calling_ae, peer),
                spool_path=str(entry.path),
                sha256=entry.sha256,
                size_bytes=entry.size,
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

    def _store_journaled(
        self,
        journal: JournaledStore,
        header: ObjectHeader,
        classification: Classification,
        data: bytes,
        calling_ae: str,
        peer: str,
    ) -> Status:
        """Success once the object is in the journal, fsynced; its spool file and row follow
        in the journal's thread, which also logs "stored instance" and calls ``on_stored``."""
        refusal = journal.refusal(len(data))
        if refusal is not None:
            message = "database unavailable, store refused" if refusal == "database unavailable" else "store refused"
            logger.error(message, extra={"calling_ae": calling_ae, "reason": refusal})
            return _status(STATUS_OUT_OF_RESOURCES, f"out of resources: {refusal}")
        try:
            journal.store(journal_entry(
                **_receipt(header, classification, calling_ae, peer),
                spool_path=journal.plan(len(data)).as_posix(),
                kind=classification.kind,
            ), data)
        except SpoolError as exc:
            return _spool_refusal(exc, calling_ae)
        return _status(STATUS_SUCCESS, "")

    def _discard(self, path: Any) -> None:
        try:
            self._spool.delete(path)
        except Exception as exc:  # reconciliation quarantines what is left
            logger.error("cannot remove spool file", extra={"path": str(path), "error": str(exc)})


# --------------------------------------------------------------------------- association policy


class AssociationPolicy:
    """Calling-AE allow-list with optional host binding, checked when the request arrives.

    The acceptor asks ``permits`` and answers a refusal with A-ASSOCIATE-RJ "calling AE
    title not recognised" (permanent, service user, 3), for an unknown title and for a
    known title from the wrong address.
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


def supported_contexts() -> list[PresentationContext]:
    """Verification and every storage SOP class, each with every transfer syntax pynetdicom knows."""
    return [
        build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in (str(Verification), *storage_sop_classes())
    ]


def acceptor_settings(cfg: ListenerConfig) -> AcceptorSettings:
    return AcceptorSettings(
        ae_title=cfg.ae_title,
        require_called_ae_title=cfg.require_called_ae_title,
        max_associations=cfg.max_associations,
        acse_timeout=cfg.acse_timeout_seconds,
        dimse_timeout=cfg.dimse_timeout_seconds,
        network_timeout=cfg.network_timeout_seconds,
        max_pdu_bytes=cfg.max_pdu_bytes,
    )


class StorageSCP:
    """The listening AE: ``start()`` returns once the port is bound; ``stop()`` drains.

    Several processes may serve one port: each gets a StorageSCP and ``start`` with the
    same inherited listening socket (``listener.receivers``).
    """

    def __init__(
        self,
        cfg: NodeConfig,
        spool: SpoolLike,
        repo: RepositoryLike,
        *,
        on_stored: Callable[[], None] | None = None,
        journal_name: str = "node",
    ) -> None:
        self._cfg = cfg.listener
        self._policy = AssociationPolicy(cfg.listener)
        self._journal = _journal_for(cfg, spool, repo, journal_name, on_stored)
        self._handler = StoreHandler(
            spool, repo, max_pixels=cfg.listener.max_pixels, report_cfg=cfg.report, on_stored=on_stored,
            journal=self._journal,
        )
        self._acceptor: AssociationAcceptor | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        if self._acceptor is None:
            raise RuntimeError("the listener is not running")
        return self._acceptor.address

    def start(
        self,
        on_response: Callable[[Command, Status], None] | None = None,
        listening: socket.socket | None = None,
        shared_count: SharedAssociationCount | None = None,
    ) -> None:
        """Bind (or take ``listening``, already bound) and serve; ``on_response`` observes
        every response just before it is sent (e.g. in tests); ``shared_count``: the
        node-wide association count when several receiver processes share ``listening``."""
        with self._lock:
            if self._acceptor is not None:
                return
            if self._journal is not None:
                self._open_journal(self._journal)  # applies what a crash left before the port opens
            acceptor = AssociationAcceptor(
                acceptor_settings(self._cfg),
                supported_contexts(),
                AcceptorCallbacks(self._policy.permits, self._handler, on_response),
                ssl_context=_server_ssl_context(self._cfg),
                shared_count=shared_count,
            )
            acceptor.start(listening or listening_socket(self._cfg.host, self._cfg.port))
            self._acceptor = acceptor
        logger.info(
            "listening",
            extra={"ae_title": self._cfg.ae_title, "host": self._cfg.host, "port": self.address[1]},
        )

    def _open_journal(self, journal: JournaledStore) -> None:
        try:
            journal.open()
        except SpoolError as exc:
            # the same promise without the journal: file and row before each answer
            logger.warning(
                "journal unavailable, stores use the direct durable path",
                extra={"journal": str(journal.settings.directory), "reason": str(exc)},
            )
            self._journal = self._handler.journal = None

    def wait_stored(self, timeout: float = 10.0) -> bool:
        """Wait until every acknowledged object is in the spool and the database: at once
        without the journal, else until its thread has applied it; False on timeout."""
        return self._journal is None or self._journal.wait_applied(timeout)

    def active_associations(self) -> int:
        acceptor = self._acceptor
        return acceptor.active_associations() if acceptor is not None else 0

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop accepting associations, let open ones finish (up to the grace period), then abort the rest.

        A store whose handler is running when the association is aborted still
        completes its write and commit; only its response is lost, so the sender
        re-sends and the copy is recognised as a duplicate.
        """
        grace = self._cfg.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        with self._lock:
            acceptor, self._acceptor = self._acceptor, None
        if acceptor is None:
            return
        aborted = acceptor.stop(grace)
        if self._journal is not None:
            self._journal.close()
        logger.info("listener stopped", extra={"aborted": aborted})


def journal_settings(cfg: NodeConfig, spool: Spool, name: str) -> JournalSettings:
    """Where the journal called ``name`` lives (one per receiver: ``<spool root>/.journal/NAME``)."""
    journal = cfg.storage.journal
    return JournalSettings(
        directory=spool.root / JOURNALS_FOLDER / name,
        segment_bytes=journal.segment_mib * 1024 * 1024,
        max_backlog_bytes=journal.max_backlog_mib * 1024 * 1024,
        quarantine_dir=Path(cfg.storage.quarantine_dir),
    )


def _journal_for(
    cfg: NodeConfig, spool: SpoolLike, repo: RepositoryLike, name: str, on_stored: Callable[[], None] | None
) -> JournaledStore | None:
    """The journal when configured and the storage is the real one (tests wrap or fake
    the spool and repository to watch the direct path)."""
    if not cfg.storage.journal.enabled or not isinstance(spool, Spool) or not isinstance(repo, Repository):
        return None
    return JournaledStore(journal_settings(cfg, spool, name), spool, repo, on_stored=on_stored)


def apply_leftover_journals(cfg: NodeConfig, spool: Spool, repo: Repository) -> int:
    """Apply every journal under the spool (whatever receiver wrote it) before any listener
    starts: a node restarted with fewer receiver processes must not leave one behind."""
    folder = spool.root / JOURNALS_FOLDER
    if not folder.is_dir():
        return 0
    found = 0
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        found += JournaledStore(journal_settings(cfg, spool, child.name), spool, repo).apply_leftovers()
    return found
