"""Helpers for the hostile-input, fuzz, access and load tests (and the benchmarks).

* ``start_listener``: the real listener (``listener.scp.StorageSCP``) in this process,
  with the real ``Spool`` and ``Repository`` on a SQLite file under a tmp folder.
* ``RawSCU``: a pynetdicom association that sends a C-STORE whose data set is an
  arbitrary byte string, exactly as given (pydicom never re-encodes it), so that
  broken and mutated encodings reach the listener unchanged.
* synthetic datasets (no network, no pydicom test-file download) and their encodings.
* ``make_tiny_bundle``: an untrained, seeded ``dski-tiny`` detector bundle.
* ``rss_kib``: resident memory of a process, from /proc.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from benchmarks.common import tree_memory
from listener.config import NodeConfig, parse_config
from listener.dimse import (
    STATUS_BAD_UID,
    STATUS_CANNOT_UNDERSTAND,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SOP_CLASS_MISMATCH,
    STATUS_SUCCESS,
    STATUS_TOO_LARGE,
    STATUS_UID_MISMATCH,
)
from listener.scp import StorageSCP
from storage.database import Database
from storage.repository import Repository
from storage.spool import Spool
from tests.peers import free_port

AET = "DSKI"
SCU_AET = "FUZZER"

# Every status the listener documents for a C-STORE (listener/dimse.py); a response with
# any other code, or no response at all, is a fuzz failure.
DOCUMENTED_STATUSES = frozenset(
    {
        STATUS_SUCCESS,
        STATUS_OUT_OF_RESOURCES,
        STATUS_SOP_CLASS_MISMATCH,
        STATUS_CANNOT_UNDERSTAND,
        STATUS_BAD_UID,
        STATUS_UID_MISMATCH,
        STATUS_TOO_LARGE,
        STATUS_PROCESSING_FAILURE,
    }
)

SecondaryCaptureImageStorage = "1.2.840.10008.5.1.4.1.1.7"
UltrasoundImageStorage = "1.2.840.10008.5.1.4.1.1.6.1"
DigitalXRayImageStorageForPresentation = "1.2.840.10008.5.1.4.1.1.1.1"
ComprehensiveSRStorage = "1.2.840.10008.5.1.4.1.1.88.33"
EncapsulatedPDFStorage = "1.2.840.10008.5.1.4.1.1.104.1"

MODALITY_CLASSES = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "US": UltrasoundImageStorage,
}


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size of a process in KiB (VmRSS from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def tree_rss_kib(pid: int) -> int:
    """VmRSS in KiB of a process and all its descendants (a node with its receiver processes)."""
    return tree_memory(pid, ("VmRSS",))["VmRSS"] // 1024


# --------------------------------------------------------------------------- the listener


def listener_config(port: int, *, calling_aes: Sequence[dict[str, Any]] | None = None, **listener: Any) -> NodeConfig:
    if calling_aes is None:
        calling_aes = [
            {"ae_title": SCU_AET, "host": "127.0.0.1"},
            {"ae_title": "STORESCU", "host": "127.0.0.1"},
            {"ae_title": "ECHOSCU", "host": "127.0.0.1"},
        ]
    return parse_config(
        {
            "listener": {
                "ae_title": AET,
                "host": "127.0.0.1",
                "port": port,
                "calling_aes": list(calling_aes),
                "shutdown_grace_seconds": 2,
                **listener,
            },
            "storage": {"min_free_bytes": 0},
        }
    )


@dataclass
class ListenerHandle:
    scp: StorageSCP
    spool: Spool
    repo: Repository
    db: Database
    db_path: Path
    cfg: NodeConfig

    @property
    def port(self) -> int:
        return self.scp.address[1]

    def settle(self) -> None:
        """Wait until what was acknowledged is in the spool and the database (the write-ahead
        journal applies it within milliseconds, storage.journal_apply)."""
        assert self.scp.wait_stored(10), "journal not applied within 10 s"

    def rows(self, where: str = "", *args: Any) -> list[sqlite3.Row]:
        """Committed ``instances`` rows, read through a separate connection."""
        self.settle()
        con = sqlite3.connect(self.db_path)
        con.row_factory = sqlite3.Row
        try:
            return con.execute(f"SELECT * FROM instances {where} ORDER BY id", args).fetchall()
        finally:
            con.close()

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        self.settle()
        con = sqlite3.connect(self.db_path)
        con.row_factory = sqlite3.Row
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def spool_files(self) -> list[Path]:
        self.settle()
        return sorted(self.spool.root / p for p in self.spool.iter_files())

    def stop(self) -> None:
        self.scp.stop(grace_seconds=2)
        self.db.dispose()


def start_listener(tmp_path: Path, *, port: int = 0, cfg: NodeConfig | None = None, on_stored=None, **listener: Any) -> ListenerHandle:
    """The real StorageSCP on 127.0.0.1 (port 0: a free one is picked), real spool and SQLite."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    db_path = tmp_path / "dski.sqlite3"
    db = Database(f"sqlite:///{db_path}")
    db.migrate()
    repo = Repository(db)
    spool = Spool(tmp_path / "spool", 0)
    for attempt in range(5):  # a port picked free can be taken by a parallel run before the bind
        use = cfg or listener_config(port or free_port(), **listener)
        scp = StorageSCP(use, spool, repo, on_stored=on_stored)
        try:
            scp.start()
        except OSError:
            if port or cfg is not None or attempt == 4:
                raise
            continue
        return ListenerHandle(scp, spool, repo, db, db_path, use)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- a raw-bytes SCU


def _empty_file() -> Path:
    import tempfile

    path = Path(tempfile.gettempdir()) / "dski-hostile-empty.bin"
    if not path.exists() or path.stat().st_size:
        path.write_bytes(b"")
    return path


class NoResponse(Exception):
    """The association ended (abort, release, timeout) before a C-STORE response came."""


class RawSCU:
    """One association to the listener; ``store_raw`` sends any bytes as the data set.

    ``contexts`` are (abstract syntax, [transfer syntaxes]) pairs to propose.
    """

    def __init__(
        self,
        port: int,
        contexts: Iterable[tuple[str, Sequence[str]]] = (),
        *,
        host: str = "127.0.0.1",
        aet: str = SCU_AET,
        called: str = AET,
        timeout: float = 10.0,
        bind_address: tuple[str, int] | None = None,
        tls_args: Any = None,
    ) -> None:
        self.ae = AE(ae_title=aet)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = timeout
        self.ae.connection_timeout = timeout
        for abstract, syntaxes in contexts:
            self.ae.add_requested_context(abstract, list(syntaxes))
        if not any(str(cx.abstract_syntax) == Verification for cx in self.ae.requested_contexts):
            self.ae.add_requested_context(Verification)
        kwargs: dict[str, Any] = {"ae_title": called}
        if bind_address is not None:
            kwargs["bind_address"] = bind_address
        if tls_args is not None:
            kwargs["tls_args"] = tls_args
        self.assoc = self.ae.associate(host, port, **kwargs)

    @property
    def established(self) -> bool:
        return self.assoc.is_established

    def __enter__(self) -> "RawSCU":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.assoc.is_established:
                self.assoc.release()
        finally:
            self.ae.shutdown()

    def echo(self) -> int | None:
        status = self.assoc.send_c_echo()
        return int(status.Status) if status and "Status" in status else None

    def store_raw(
        self,
        payload: bytes,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str = ExplicitVRLittleEndian,
        *,
        msg_id: int = 1,
    ) -> Dataset:
        """C-STORE with ``payload`` as the encoded data set; returns the response's status dataset.

        Raises ``NoResponse`` when the association is gone or no response arrives.
        """
        assoc = self.assoc
        if not assoc.is_established:
            raise NoResponse("association not established")
        context = next(
            (
                cx
                for cx in assoc.accepted_contexts
                if cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == transfer_syntax
            ),
            None,
        )
        if context is None:
            raise ValueError(f"no accepted context for {sop_class} / {transfer_syntax}")
        req = C_STORE()
        req.MessageID = msg_id
        req.Priority = 2
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_instance
        if payload:
            req.DataSet = BytesIO(payload)
        else:
            # pynetdicom sends no data-set PDV for an empty BytesIO while the command still
            # announces a data set (the peer would wait for it until its DIMSE timeout); an
            # empty file sent "from disk" gives the one, zero-length, last data-set fragment
            # that a zero-length data set is on the wire.
            req.DataSet = None
            req._dataset_path = (_empty_file(), 0)
        # the same dance as Association.send_c_store: pause the reactor, send, wait for the response
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            assoc.dimse.send_msg(req, int(context.context_id))
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        if rsp is None:
            if assoc.is_established:
                assoc._handle_no_response()
            raise NoResponse("no C-STORE response")
        status = Dataset()
        status.Status = int(rsp.Status)
        if getattr(rsp, "ErrorComment", None):
            status.ErrorComment = rsp.ErrorComment
        return status

    def store_status(self, payload: bytes, sop_class: str, sop_instance: str, transfer_syntax: str = ExplicitVRLittleEndian) -> int:
        return int(self.store_raw(payload, sop_class, sop_instance, transfer_syntax).Status)


def all_contexts(syntaxes: Sequence[str] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)) -> list[tuple[str, Sequence[str]]]:
    """One context per (SOP class, transfer syntax) for the classes the helpers build."""
    classes = [*MODALITY_CLASSES.values(), SecondaryCaptureImageStorage, ComprehensiveSRStorage, EncapsulatedPDFStorage]
    return [(c, [ts]) for c in classes for ts in syntaxes]


# --------------------------------------------------------------------------- datasets


def image_dataset(
    modality: str = "CT",
    *,
    rows: int = 64,
    columns: int = 64,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """A small, valid, 16-bit greyscale image of ``modality`` with fresh UIDs and file meta."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.SOPClassUID = MODALITY_CLASSES.get(modality, SecondaryCaptureImageStorage)
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.PatientID = "HOSTILE-1"
    ds.PatientName = "Hostile^Input"
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = rng.integers(0, 4096, (rows, columns), dtype=np.uint16).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    return ds


def sr_dataset() -> Dataset:
    """A minimal Comprehensive SR (a non-image object)."""
    ds = Dataset()
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = "HOSTILE-1"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "126000", "DCM", "Imaging Measurement Report"
    ds.ConceptNameCodeSequence = [concept]
    ds.ContentSequence = []
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def pdf_dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DOC"
    ds.PatientID = "HOSTILE-1"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocument = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def encode_dataset(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """The data set (no preamble, no file meta) as it travels in a C-STORE."""
    implicit = transfer_syntax == ImplicitVRLittleEndian
    data = encode(ds, implicit, True, False)
    if data is None:
        raise ValueError("pydicom could not encode the dataset")
    return data


def write_file(ds: Dataset, path: Path) -> Path:
    """A DICOM file (preamble + meta) for storescu / dski detect."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def write_raw_file(meta_ds: Dataset, payload: bytes, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    """Preamble + a valid file meta for ``meta_ds`` + ``payload`` as the data set, byte for byte."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = meta_ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = meta_ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + buf.getvalue() + payload)
    return path


def explicit_element(group: int, element: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian element, any VR and value, encoded by hand."""
    tag = group.to_bytes(2, "little") + element.to_bytes(2, "little")
    if vr in {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}:
        return tag + vr.encode() + b"\x00\x00" + len(value).to_bytes(4, "little") + value
    return tag + vr.encode() + len(value).to_bytes(2, "little") + value


# --------------------------------------------------------------------------- a detector bundle


def make_tiny_bundle(path: Path, seed: int = 0) -> Path:
    """An untrained, seeded dski-tiny bundle (the same recipe as tests/detector/conftest.py)."""
    import torch

    from detector.bundle import RetrievalSettings, save_bundle
    from detector.methods import build_model
    from detector.preprocess import PreprocessConfig
    from detector.spec import ModelSpec

    spec = ModelSpec()
    torch.manual_seed(seed)
    model = build_model(spec)
    cfg = PreprocessConfig(semantic_size=spec.backbone.image_size, noise_crop=spec.noise_crop)
    save_bundle(
        path,
        model,
        spec,
        cfg,
        name="dski-hostile",
        version="0.1.0",
        threshold=0.5,
        retrieval=RetrievalSettings(k=4, lam=0.3, temperature=0.1),
    )
    return path


# --------------------------------------------------------------------------- mutation of encoded data sets
#
# A mutation is a plain tuple, so hypothesis can generate and shrink it and a seeded
# random.Random can produce the same kinds for the long benchmark run:
#   ("flip", where, xor)             XOR one byte (where in [0, 1): relative position)
#   ("truncate", where)              cut the data set
#   ("length", index, value)         set the length field of the index-th top-level element
#   ("vr", index, vr)                replace the VR code of the index-th element (explicit VR)
#   ("nest", index, depth, closed)   insert a sequence nested `depth` deep before the element
#   ("insert", where, data)          insert bytes
#   ("duplicate", where, size)       repeat a chunk
#   ("delimiter", index, tag)        insert an item / sequence delimiter or item tag

VR_CODES = (
    "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV"
).split() + ["XX", "\x00\x00", "\xff\xff", "ob"]
LENGTH_VALUES = (0, 1, 2, 3, 7, 0xFF, 0xFFFF, 0xFFFE, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF, 0x10000, 1 << 24)
DELIMITERS = (b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0")
MUTATION_KINDS = ("flip", "truncate", "length", "vr", "nest", "insert", "duplicate", "delimiter")

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


@dataclass(frozen=True)
class ElementPos:
    offset: int
    header: int  # 8 or 12
    length_at: int
    length_size: int  # 2 or 4
    vr_at: int | None  # None for implicit VR


def walk_elements(data: bytes, implicit: bool = False) -> list[ElementPos]:
    """Top-level element headers of an encoded data set (Little Endian); stops at an undefined length."""
    out: list[ElementPos] = []
    pos = 0
    while pos + 8 <= len(data):
        if implicit:
            item = ElementPos(pos, 8, pos + 4, 4, None)
        elif data[pos + 4 : pos + 6] in _LONG_VRS:
            item = ElementPos(pos, 12, pos + 8, 4, pos + 4)
        else:
            item = ElementPos(pos, 8, pos + 6, 2, pos + 4)
        out.append(item)
        length = int.from_bytes(data[item.length_at : item.length_at + item.length_size], "little")
        if length == 0xFFFFFFFF:
            break
        pos += item.header + length
    return out


def _nested_sequence(depth: int, closed: bool, implicit: bool) -> bytes:
    """(0008,1140) Referenced Image Sequence nested `depth` items deep, undefined lengths."""
    head = b"\x08\x00\x40\x11" + (b"\xff\xff\xff\xff" if implicit else b"SQ\x00\x00\xff\xff\xff\xff")
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    body = (head + item) * depth
    return body + (close * depth if closed else b"")


def apply_mutations(data: bytes, mutations: Sequence[tuple], implicit: bool = False) -> bytes:
    buf = bytearray(data)
    for m in mutations:
        kind = m[0]
        elements = walk_elements(bytes(buf), implicit) if kind in {"length", "vr", "nest", "delimiter"} else []
        if kind == "flip":
            if buf:
                buf[int(m[1] * len(buf)) % len(buf)] ^= m[2] or 1
        elif kind == "truncate":
            del buf[int(m[1] * len(buf)) :]
        elif kind == "length" and elements:
            el = elements[m[1] % len(elements)]
            value = m[2] & (0xFFFF if el.length_size == 2 else 0xFFFFFFFF)
            buf[el.length_at : el.length_at + el.length_size] = value.to_bytes(el.length_size, "little")
        elif kind == "vr" and elements and not implicit:
            el = elements[m[1] % len(elements)]
            assert el.vr_at is not None
            buf[el.vr_at : el.vr_at + 2] = m[2].encode("latin-1")[:2].ljust(2, b"\x00")
        elif kind == "nest":
            at = elements[m[1] % len(elements)].offset if elements else 0
            buf[at:at] = _nested_sequence(m[2], m[3], implicit)
        elif kind == "insert":
            at = int(m[1] * len(buf)) if buf else 0
            buf[at:at] = m[2]
        elif kind == "duplicate" and buf:
            at = int(m[1] * len(buf))
            buf[at:at] = buf[at : at + m[2]]
        elif kind == "delimiter":
            at = elements[m[1] % len(elements)].offset if elements else 0
            buf[at:at] = m[2] + b"\x00\x00\x00\x00"
    return bytes(buf)


def random_mutations(rng: "random.Random", max_mutations: int = 3) -> list[tuple]:
    """The same kinds of mutations as the hypothesis strategy, from a seeded random.Random."""
    out: list[tuple] = []
    for _ in range(rng.randint(1, max_mutations)):
        kind = rng.choice(MUTATION_KINDS)
        if kind == "flip":
            out.append(("flip", rng.random(), rng.randint(1, 255)))
        elif kind == "truncate":
            out.append(("truncate", rng.random()))
        elif kind == "length":
            value = rng.choice(LENGTH_VALUES) if rng.random() < 0.7 else rng.getrandbits(32)
            out.append(("length", rng.randint(0, 40), value))
        elif kind == "vr":
            out.append(("vr", rng.randint(0, 40), rng.choice(VR_CODES)))
        elif kind == "nest":
            out.append(("nest", rng.randint(0, 40), rng.choice((1, 2, 8, 64, 500, 3000)), rng.random() < 0.5))
        elif kind == "insert":
            out.append(("insert", rng.random(), rng.randbytes(rng.randint(1, 64))))
        elif kind == "duplicate":
            out.append(("duplicate", rng.random(), rng.randint(1, 4096)))
        else:
            out.append(("delimiter", rng.randint(0, 40), rng.choice(DELIMITERS)))
    return out


@dataclass(frozen=True)
class Seed:
    name: str
    payload: bytes
    sop_class: str
    sop_instance: str
    transfer_syntax: str


def seed_corpus() -> list[Seed]:
    """Well-formed data sets the fuzzer starts from: images (explicit, implicit, RLE), SR with nested
    sequences, an encapsulated PDF."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    seeds: list[Seed] = []
    for modality in ("CT", "MR"):
        ds = image_dataset(modality, rows=32, columns=32)
        seeds.append(Seed(f"{modality}-explicit", encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian))
    ds = image_dataset("DX", rows=32, columns=32)
    seeds.append(Seed("DX-implicit", encode_dataset(ds, ImplicitVRLittleEndian), ds.SOPClassUID, ds.SOPInstanceUID, ImplicitVRLittleEndian))
    ds = image_dataset("US", rows=16, columns=16)
    ds.PixelData = encapsulate([bytes(64)])
    ds["PixelData"].VR = "OB"
    seeds.append(Seed("US-rle", encode_dataset(ds), ds.SOPClassUID, ds.SOPInstanceUID, RLELossless))
    sr = sr_dataset()
    inner = Dataset()
    inner.RelationshipType, inner.ValueType, inner.TextValue = "CONTAINS", "TEXT", "nested"
    level2 = Dataset()
    level2.RelationshipType, level2.ValueType = "CONTAINS", "CONTAINER"
    level2.ContentSequence = [inner, inner]
    sr.ContentSequence = [level2]
    seeds.append(Seed("SR-nested", encode_dataset(sr), sr.SOPClassUID, sr.SOPInstanceUID, ExplicitVRLittleEndian))
    pdf = pdf_dataset()
    seeds.append(Seed("PDF", encode_dataset(pdf), pdf.SOPClassUID, pdf.SOPInstanceUID, ExplicitVRLittleEndian))
    return seeds


def fuzz_contexts() -> list[tuple[str, Sequence[str]]]:
    return [(s.sop_class, [s.transfer_syntax]) for s in seed_corpus()]


class FuzzClient:
    """Sends fuzz cases over one association, opening a new one when the listener closed it.

    ``send`` returns the DIMSE status, or None when no response came (counted as a failure
    by the callers: every case must get a status).
    """

    def __init__(self, port: int, *, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self.contexts = fuzz_contexts()
        self.scu: RawSCU | None = None
        self.associations = 0

    def _connect(self) -> RawSCU:
        if self.scu is None or not self.scu.established:
            if self.scu is not None:
                self.scu.close()
            self.scu = RawSCU(self.port, self.contexts, timeout=self.timeout)
            self.associations += 1
            if not self.scu.established:
                raise NoResponse("association refused")
        return self.scu

    def send(self, seed: Seed, payload: bytes, msg_id: int = 1) -> int | None:
        scu = self._connect()
        try:
            return int(scu.store_raw(payload, seed.sop_class, seed.sop_instance, seed.transfer_syntax, msg_id=msg_id).Status)
        except NoResponse:
            return None

    def echo(self) -> int | None:
        return self._connect().echo()

    def close(self) -> None:
        if self.scu is not None:
            self.scu.close()
            self.scu = None


# --------------------------------------------------------------------------- `dski serve` as a subprocess


class ServeProcess:
    """``dski serve -c config.yaml`` in its own process (the real node: listener, workers,
    scheduler), with its config, database, spool and log under ``root``; stopped by PID."""

    def __init__(
        self,
        root: Path,
        bundle: Path,
        *,
        listener: dict[str, Any] | None = None,
        processing: dict[str, Any] | None = None,
        detector: dict[str, Any] | None = None,
        destinations: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.root = Path(root)
        self.bundle = Path(bundle)
        self.listener = listener or {}
        self.processing = processing or {}
        self.detector = detector or {}
        self.destinations = list(destinations)
        self.port = 0
        self.proc: Any = None
        self.db_path = self.root / "dski.sqlite3"

    def config(self) -> dict[str, Any]:
        return {
            "listener": {
                "ae_title": AET,
                "host": "127.0.0.1",
                "port": self.port,
                "calling_aes": [
                    {"ae_title": SCU_AET, "host": "127.0.0.1"},
                    {"ae_title": "STORESCU", "host": "127.0.0.1"},
                    {"ae_title": "ECHOSCU", "host": "127.0.0.1"},
                ],
                "shutdown_grace_seconds": 5,
                **self.listener,
            },
            "storage": {
                "database_url": f"sqlite:///{self.db_path}",
                "spool_dir": str(self.root / "spool"),
                "reports_dir": str(self.root / "reports"),
                "quarantine_dir": str(self.root / "quarantine"),
                "min_free_bytes": 0,
            },
            "detector": {"bundle": str(self.bundle), "batch_size": 8, "workers": 1, "torch_threads": 1, **self.detector},
            "processing": {"series_idle_seconds": 3600, "poll_interval_seconds": 0.2, **self.processing},
            "dispatch": {"destinations": self.destinations, "interval_seconds": 1},
            "logging": {"level": "WARNING", "json": True},
        }

    def start(self, timeout: float = 90.0) -> "ServeProcess":
        import os
        import subprocess
        import sys

        import yaml

        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        cfg_path = self.root / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(self.config()))
        dski = Path(sys.executable).with_name("dski")
        self.log_path = self.root / "serve.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(dski), "serve", "-c", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dski serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with RawSCU(self.port, timeout=2) as scu:
                    if scu.established and scu.echo() == 0:
                        return self
            except Exception:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"dski serve did not answer C-ECHO within {timeout} s:\n{self.log_tail()}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self) -> int:
        """The node and its receiver processes together."""
        return tree_rss_kib(self.proc.pid)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def query(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        con = sqlite3.connect(self.db_path, timeout=30)
        con.row_factory = sqlite3.Row
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def instance_counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self.query("SELECT status, COUNT(*) FROM instances GROUP BY status")}

    def wait_processed(self, timeout: float) -> dict[str, int]:
        """Wait until no instance is received / analysing; returns the counts per status."""
        deadline = time.monotonic() + timeout
        counts = self.instance_counts()
        while time.monotonic() < deadline:
            counts = self.instance_counts()
            if not counts.get("received") and not counts.get("analysing"):
                return counts
            time.sleep(0.5)
        return counts

    def stop(self, timeout: float = 30.0) -> int | None:
        import os
        import signal
        import subprocess

        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode
