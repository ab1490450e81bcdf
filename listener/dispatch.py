"""Delivery of reports to the PACS: one C-STORE per attempt, backoff between attempts.

:func:`send_dataset` never raises for a network or peer problem: a rejected or
aborted association, a timeout, a refused connection and a failure status all come
back as ``SendResult(ok=False, error=...)``, so the scheduler can record the attempt
and plan the next one. The retry plan (:meth:`Dispatcher.next_attempt`) is pure
arithmetic on the attempt count: the outbox rows live in the database, owned by
``storage.repository``; this module has no database access.
"""

from __future__ import annotations

import copy
import logging
import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from listener.config import Destination, DispatchConfig

logger = logging.getLogger(__name__)

# C-STORE status classes (PS3.4 B.2.3 and PS3.7 C): 0x0000 success, 0xB000/0xB006/0xB007
# warnings (stored, possibly with coercion), everything else a failure.
_WARNING_STATUSES = frozenset({0x0001, 0xB000, 0xB006, 0xB007})


@dataclass(frozen=True)
class SendResult:
    ok: bool
    status: int | None  # DIMSE status of the C-STORE response; None when there was none
    error: str | None  # why it failed, for the outbox row and the log; None on success


def send_dataset(
    path_or_ds: Path | str | Dataset,
    dest: Destination,
    *,
    calling_ae: str,
    timeout: float,
) -> SendResult:
    """C-STORE one dataset (or DICOM file) to ``dest`` over a new association.

    The dataset's SOP class is proposed with Explicit and Implicit VR Little Endian.
    A warning status (stored with coercion) counts as delivered: a retry would get
    the same answer. ``timeout`` bounds connecting, association negotiation and the
    wait for the C-STORE response each.
    """
    target = f"{dest.ae_title}@{dest.host}:{dest.port}"
    try:
        ds = _load(path_or_ds)
    except (OSError, InvalidDicomError, ValueError, AttributeError) as exc:
        return SendResult(False, None, f"cannot read the report {path_or_ds}: {exc}")

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    tls_args = None
    if dest.tls:
        try:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH,
                cafile=str(dest.ca_certificates) if dest.ca_certificates else None,
            )
            if dest.certificate is not None and dest.private_key is not None:
                context.load_cert_chain(str(dest.certificate), str(dest.private_key))
        except (OSError, ssl.SSLError) as exc:
            return SendResult(False, None, f"TLS set-up for {target} failed: {exc}")
        tls_args = (context, dest.host)

    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except Exception as exc:  # pynetdicom raises for odd addresses; never let it reach the scheduler
        ae.shutdown()
        return SendResult(False, None, f"association with {target} failed: {exc}")

    try:
        if not assoc.is_established:
            if assoc.is_rejected:
                reason = _rejection(assoc)
                return SendResult(False, None, f"association rejected by {target}: {reason}")
            if assoc.is_aborted and assoc.rejected_contexts and not assoc.accepted_contexts:
                # pynetdicom itself aborts when the peer accepted none of the contexts
                return SendResult(
                    False, None, f"{target} accepted no presentation context for SOP class {ds.SOPClassUID}"
                )
            if assoc.is_aborted and not assoc.rejected_contexts and not assoc.accepted_contexts:
                # pynetdicom reports a refused or failed TCP connection as an abort too
                return SendResult(
                    False, None, f"no association with {target}: connection refused, unreachable or aborted"
                )
            if assoc.is_aborted:
                return SendResult(False, None, f"association aborted during negotiation with {target}")
            return SendResult(False, None, f"no association with {target} (connection refused or timed out)")
        if not any(cx.abstract_syntax == ds.SOPClassUID for cx in assoc.accepted_contexts):
            return SendResult(False, None, f"{target} accepted no presentation context for SOP class {ds.SOPClassUID}")
        started = time.monotonic()
        try:
            status = assoc.send_c_store(ds)
        except Exception as exc:  # encoding or socket trouble mid-transfer
            return SendResult(False, None, f"C-STORE to {target} failed: {exc}")
        if not status or "Status" not in status:
            # pynetdicom aborts on a DIMSE timeout too, so only the time taken tells a silent
            # peer from one that dropped the association. Orthanc, for one, drops the
            # association of a calling AE it does not know instead of answering with a
            # failure status.
            if time.monotonic() - started < 0.9 * timeout:
                return SendResult(
                    False,
                    None,
                    f"{target} closed the association without a C-STORE response "
                    f"(is calling AE {calling_ae!r} known to it?)",
                )
            return SendResult(False, None, f"no C-STORE response from {target} within {timeout:g} s")
        code = int(status.Status)
        if code == 0x0000 or code in _WARNING_STATUSES:
            if code != 0x0000:
                logger.warning(
                    "report stored with warning",
                    extra={"destination": dest.name, "status": f"0x{code:04X}", "sop_instance_uid": ds.SOPInstanceUID},
                )
            return SendResult(True, code, None)
        comment = status.get("ErrorComment")
        detail = f" ({comment})" if comment else ""
        return SendResult(False, code, f"{target} answered C-STORE with failure status 0x{code:04X}{detail}")
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


# Name from the architecture page.
send = send_dataset


def _load(path_or_ds: Path | str | Dataset) -> Dataset:
    if isinstance(path_or_ds, Dataset):
        ds = path_or_ds
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            # An in-memory dataset has no encoding yet; pynetdicom needs one to pick a context.
            ds = copy.copy(ds)
            ds.file_meta = FileMetaDataset(getattr(path_or_ds, "file_meta", None) or {})
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    else:
        ds = dcmread(str(path_or_ds))
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if keyword not in ds:
            raise ValueError(f"no {keyword}")
    return ds


def _rejection(assoc) -> str:
    rsp = getattr(assoc.acceptor, "primitive", None)
    result = getattr(rsp, "result_str", None)
    source = getattr(rsp, "source_str", None)
    reason = getattr(rsp, "reason_str", None)
    parts = [p for p in (result, source, reason) if p]
    return ", ".join(parts) if parts else "no reason given"


def backoff_delay(attempts: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt: initial·2^(attempts-1), capped.

    Deterministic on purpose (no jitter): the schedule can be predicted from the outbox
    row, and one node sending to one PACS has no thundering herd to spread out.
    ``attempts <= 0`` (never tried) gives 0.
    """
    if attempts <= 0:
        return 0.0
    if initial <= 0 or maximum <= 0:
        raise ValueError(f"backoff needs positive initial and maximum, got {initial} and {maximum}")
    exponent = attempts - 1
    if exponent >= 1024 or initial * math.ldexp(1.0, min(exponent, 1023)) >= maximum:
        return float(maximum)
    return float(initial * 2**exponent)


class Dispatcher:
    """Sends report files and plans retries; the outbox and its states belong to the scheduler."""

    def __init__(
        self,
        cfg: DispatchConfig,
        calling_ae: str,
        send: Callable[..., SendResult] = send_dataset,
    ) -> None:
        self.cfg = cfg
        self.calling_ae = calling_ae
        self._send = send

    def destination(self, name: str) -> Destination:
        """The configured destination called ``name``; ``KeyError`` naming it otherwise."""
        for dest in self.cfg.destinations:
            if dest.name == name:
                return dest
        raise KeyError(f"no destination named {name!r} in dispatch.destinations")

    def deliver(self, report_path: Path | str, destination: Destination | str) -> SendResult:
        dest = self.destination(destination) if isinstance(destination, str) else destination
        try:
            result = self._send(report_path, dest, calling_ae=self.calling_ae, timeout=self.cfg.timeout_seconds)
        except Exception as exc:  # an injected sender must not take the scheduler down either
            logger.exception("sender raised", extra={"destination": dest.name, "path": str(report_path)})
            result = SendResult(False, None, f"sender raised {type(exc).__name__}: {exc}")
        fields = {"destination": dest.name, "path": str(report_path), "status": result.status}
        if result.ok:
            logger.info("report delivered", extra=fields)
        else:
            logger.warning("report delivery failed", extra={**fields, "error": result.error})
        return result

    def next_attempt(self, attempts: int, now: datetime) -> datetime | None:
        """When to try again after ``attempts`` failed attempts; None once they reach max_attempts (dead)."""
        if attempts >= self.cfg.max_attempts:
            return None
        delay = backoff_delay(attempts, self.cfg.backoff_initial_seconds, self.cfg.backoff_max_seconds)
        return now + timedelta(seconds=delay)
