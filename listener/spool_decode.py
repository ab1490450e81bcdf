"""From a spool file to decoded frames and the header the SR builder keeps.

The part of a worker's preparation that reads and decodes (pydicom's parse, the pixel
decoders, windowing): pure Python and numpy, without torch or the database, so that it
runs the same in a worker thread or in a decoding process (``listener.decode_pool``).
What fails is told as one reason string, the one the instance's ``failed`` row gets.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from detector.errors import PreprocessError
from detector.pixels import (
    DECODE_GROUPS,
    DECODE_TAGS,
    DecodedDicom,
    DecodeLimits,
    decode_dataset,
)
from listener.dicom_walk import top_level_elements

__all__ = [
    "DecodeFailure",
    "SpoolDecoded",
    "decode_outcome",
    "decode_spool_file",
    "failure_reason",
    "read_for_decoding",
    "read_with_header",
]

# Where pydicom's stop_before_pixels stops: the header the SR builder keeps ends there.
_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})


@dataclass(frozen=True)
class SpoolDecoded:
    decoded: DecodedDicom
    header: bytes | None  # the file up to its Pixel Data; None for a deflated file


@dataclass(frozen=True)
class DecodeFailure:
    reason: str  # for the instance's failed row


def read_with_header(raw: bytes) -> tuple[Dataset, bytes | None]:
    """The whole data set of a DICOM file, and its bytes up to the Pixel Data (None for a
    deflated file, whose stream positions are not the file's), from one parse.

    The header is read first, up to the Pixel Data; the rest of the file is then read from
    there in the same encoding and added: the data set ``dcmread`` gives for the whole
    file, without a second parse of the header (which cost as much as the forward pass).
    """
    stream = io.BytesIO(raw)
    ds = dcmread(stream, stop_before_pixels=True)
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return dcmread(io.BytesIO(raw)), None
    header_end = stream.tell()
    is_implicit_vr, is_little_endian = ds.original_encoding
    ds.update(read_dataset(stream, is_implicit_vr, is_little_endian))
    return ds, raw[:header_end]


def read_for_decoding(raw: bytes) -> tuple[Dataset, bytes | None]:
    """The part of a file that ``decode_dataset`` reads (``DECODE_TAGS``, ``DECODE_GROUPS`` and
    the File Meta), and its bytes up to the Pixel Data, as ``read_with_header`` gives them.

    pydicom's parse of every element of the file (about 260 for a CT image, most of them
    patient, study and private ones that decoding never reads) cost as much as the pixel
    decoding itself. A walk over the element headers (``listener.dicom_walk``) finds the elements
    decoding needs, and pydicom parses only those. A file the walk cannot follow with
    certainty, or a deflated one, is read whole by ``read_with_header``, so that its
    errors are pydicom's as before.
    """
    walked = top_level_elements(raw)
    if walked is None:
        return read_with_header(raw)
    meta_end, enc, elements = walked
    little = enc.tag == "<HH"
    header_end = next((first for tag, first, _ in elements if tag in _PIXEL_DATA_TAGS), len(raw))
    # Each element's bytes stand alone (tag, VR, length, value), so the wanted ones, joined in
    # their order, are a data set of their own: one parse.
    wanted = b"".join(raw[first:end] for tag, first, end in elements
                      if tag >> 16 in DECODE_GROUPS or tag in DECODE_TAGS)
    ds = read_dataset(io.BytesIO(wanted), enc.implicit, little)
    ds.file_meta = FileMetaDataset(read_dataset(io.BytesIO(raw[132:meta_end]), False, True))
    ds.set_original_encoding(enc.implicit, little)
    return ds, raw[:header_end]


def decode_spool_file(path: str, source: str, limits: DecodeLimits) -> SpoolDecoded:
    """Read and decode one spool file; raises ``PreprocessError``, ``OSError`` or pydicom's errors."""
    with open(path, "rb") as fh:
        raw = fh.read()
    ds, header = read_for_decoding(raw)
    return SpoolDecoded(decode_dataset(ds, source, limits), header)


def failure_reason(exc: Exception) -> str:
    """What an instance's row says when preparing it raised ``exc``."""
    if isinstance(exc, PreprocessError):
        return exc.reason
    if isinstance(exc, OSError):
        return f"cannot read spool file: {exc}"
    # pydicom and the decoders on broken data: a defined failure, not a score
    return f"cannot prepare image: {type(exc).__name__}: {exc}"


def decode_outcome(path: str, source: str, limits: DecodeLimits) -> SpoolDecoded | DecodeFailure:
    """``decode_spool_file`` with its failure as a value: what a decoding process sends back
    (an arbitrary exception from a decoder might not survive pickling)."""
    try:
        return decode_spool_file(path, source, limits)
    except Exception as exc:
        return DecodeFailure(failure_reason(exc))
