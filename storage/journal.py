"""Write-ahead receive journal: one append and one fdatasync make a received object durable.

The durable store of ``storage.spool`` costs, per object, a file creation, an fsync, a
rename, a folder fsync and a committed database row: 0.5 to 0.9 ms of system calls on
the development machine (``benchmarks/store_floor.py``), on the path of every C-STORE
response. The journal takes that path off the response: the listener appends the
object and its future row to a segment file that was zero-filled and fsynced in advance
and answers once ``fdatasync`` returns (0.08 ms for a 40 kB record here, since no block
allocation or file-size change has to reach the disk). ``storage.journal_apply`` then
writes the spool file and commits the row in the background, and only after both are
durable is the record's space given back. At start-up, records not yet applied are
applied again (idempotently) before the listener opens.

Layout: ``<dir>/<sequence:016x>.seg`` segments of ``segment_bytes``, a spare
``<dir>/spare.seg`` prepared ahead, and records::

    magic "DSKJ" | segment sequence u64 | meta length u32 | data length u64 | crc32 u32 | meta | data

The crc covers the sequence, both lengths, meta and data. A reader stops at the first
record that is not whole and valid: a torn write, zeros, or a record of an earlier use
of a recycled segment file (its sequence differs). Appends are written in order under a
lock before their fdatasync, so an object whose append returned is preceded only by
whole records, and a crash can cost only objects that were never acknowledged.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from storage.batching import GroupCommit
from storage.errors import SpoolFullError, SpoolWriteError
from storage.spool import fsync_dir

__all__ = ["JournalRecord", "ReceiveJournal", "journal_records", "segment_files"]

logger = logging.getLogger(__name__)

MAGIC = b"DSKJ"
_HEADER = struct.Struct("<4sQIQI")
_CRC_FIELDS = struct.Struct("<QIQ")
_SEGMENT_NAME = re.compile(r"^([0-9a-f]{16})\.seg$")
SPARE_NAME = "spare.seg"
_ZERO_CHUNK = 1 << 20
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


@dataclass(frozen=True)
class JournalRecord:
    """One journaled object: where it lies, its metadata (the caller's encoding) and its bytes."""

    segment: int
    offset: int
    meta: bytes
    data: bytes

    @property
    def size(self) -> int:
        return _HEADER.size + len(self.meta) + len(self.data)


def _crc(sequence: int, meta: bytes, data: bytes) -> int:
    crc = zlib.crc32(_CRC_FIELDS.pack(sequence, len(meta), len(data)))
    crc = zlib.crc32(meta, crc)
    return zlib.crc32(data, crc)


def encode_record(sequence: int, meta: bytes, data: bytes) -> bytes:
    header = _HEADER.pack(MAGIC, sequence, len(meta), len(data), _crc(sequence, meta, data))
    return b"".join((header, meta, data))


def read_records(path: Path, sequence: int) -> Iterator[JournalRecord]:
    """The whole, valid records of segment ``sequence`` stored at ``path``, in order."""
    blob = path.read_bytes()
    view = memoryview(blob)
    offset = 0
    while offset + _HEADER.size <= len(blob):
        magic, seq, meta_len, data_len, crc = _HEADER.unpack_from(blob, offset)
        if magic != MAGIC or seq != sequence:
            return
        start = offset + _HEADER.size
        end = start + meta_len + data_len
        if end > len(blob):
            return
        meta = bytes(view[start:start + meta_len])
        data = bytes(view[start + meta_len:end])
        if _crc(seq, meta, data) != crc:
            return
        yield JournalRecord(sequence, offset, meta, data)
        offset = end


def segment_files(directory: Path) -> list[tuple[int, Path]]:
    """(sequence, path) of the segments in ``directory``, oldest first (the spare excluded)."""
    return sorted(
        (int(m.group(1), 16), directory / name) for name in os.listdir(directory) if (m := _SEGMENT_NAME.match(name))
    )


def journal_records(directory: Path) -> list[JournalRecord]:
    """Every whole, valid record in ``directory``'s segments, oldest first, read without
    opening the journal (tools and tests that look at what a receiver left)."""
    return [r for sequence, path in segment_files(directory) for r in read_records(path, sequence)]


def _zero_filled(path: Path, size: int) -> None:
    """A file of ``size`` zero bytes, written (not merely allocated) and fsynced: later
    overwrites then change no block map or size, and fdatasync flushes data alone."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        zeros = bytes(_ZERO_CHUNK)
        left = size
        while left > 0:
            left -= os.write(fd, zeros[:min(left, _ZERO_CHUNK)])
        os.fsync(fd)
    except BaseException:
        path.unlink(missing_ok=True)  # a partial segment would only hold the space
        raise
    finally:
        os.close(fd)


class _Segment:
    """An open segment: its file, how far it is written and how much of it is applied."""

    def __init__(self, sequence: int, path: Path) -> None:
        self.sequence = sequence
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.write_offset = 0
        self.appended = 0  # records written
        self.applied = 0  # records the applier has made durable elsewhere
        self.pending_bytes = 0  # bytes of records not yet applied
        self.sealed = False  # no more appends: full, or the journal closed

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _sync_segments(segments: list[_Segment]) -> list[None]:
    for segment in dict.fromkeys(segments):
        segment.sync()
    return [None] * len(segments)


class ReceiveJournal:
    """The journal of one receiver (one process: a directory is never shared).

    ``recover()`` first: it returns the records a crash left unapplied and starts a new
    segment. Then ``append`` from any thread; ``on_durable`` is called with each record
    right after its fdatasync, before ``append`` returns, so no record can be durable
    without its applier knowing. ``applied(record)`` gives its space back.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        segment_bytes: int,
        on_durable: Callable[[JournalRecord], None],
    ) -> None:
        if segment_bytes < 64 * 1024:
            raise ValueError(f"segment_bytes must be at least 64 KiB, got {segment_bytes}")
        self.directory = Path(directory)
        self.segment_bytes = int(segment_bytes)
        self._on_durable = on_durable
        self._lock = threading.Lock()
        self._segments: dict[int, _Segment] = {}
        self._current: _Segment | None = None
        self._next_sequence = 1
        self._recovered = False
        self._pending_bytes = 0
        self._sync: GroupCommit[_Segment, None] = GroupCommit(_sync_segments)

    # -- start-up --------------------------------------------------------------------

    def recover(self) -> list[JournalRecord]:
        """Records of earlier runs that may not be applied, oldest first; their segments are
        tracked as unapplied until ``applied`` is called for each. ``start`` then opens a new
        segment for appends."""
        self.directory.mkdir(parents=True, exist_ok=True)
        records: list[JournalRecord] = []
        with self._lock:
            if self._recovered:
                raise RuntimeError("recover() runs once, before the first append")
            for sequence, path in segment_files(self.directory):
                segment_records = list(read_records(path, sequence))
                segment = _Segment(sequence, path)
                segment.sealed = True
                segment.appended = len(segment_records)
                segment.pending_bytes = sum(r.size for r in segment_records)
                self._pending_bytes += segment.pending_bytes
                self._segments[sequence] = segment
                records.extend(segment_records)
                self._next_sequence = max(self._next_sequence, sequence + 1)
            for segment in list(self._segments.values()):
                if segment.appended == 0:
                    self._free(segment)
            self._recovered = True
        if records:
            logger.warning(
                "journal records to apply again",
                extra={"journal": str(self.directory), "records": len(records)},
            )
        return records

    def start(self) -> None:
        """Open a new segment for appends (after ``recover``). Raises ``SpoolFullError`` or
        ``SpoolWriteError`` when the segment cannot be written: the caller then serves
        without the journal."""
        with self._lock:
            if not self._recovered:
                raise RuntimeError("start() needs recover() first")
            if self._current is not None:
                return
            try:
                self._current = self._open_new_segment()
            except OSError as exc:
                raise self._error(self.directory / f"{self._next_sequence - 1:016x}.seg", exc) from exc

    # -- appending -------------------------------------------------------------------

    def fits(self, size: int) -> bool:
        """Whether an object of ``size`` bytes goes through the journal (at most a quarter of a
        segment, so that a full segment wastes little); larger ones use the spool directly."""
        return size <= self.segment_bytes // 4

    @property
    def pending_bytes(self) -> int:
        """Bytes of records appended and not yet applied: the applier's backlog."""
        return self._pending_bytes

    def append(self, meta: bytes, data: bytes) -> JournalRecord:
        """Write one record and return once it is durable (shared fdatasync with
        concurrent appends). Raises ``SpoolFullError`` on ENOSPC and ``SpoolWriteError``
        on any other I/O error; a record whose append raised was never acknowledged."""
        with self._lock:
            segment = self._current
            if segment is None:
                raise RuntimeError("the journal is not open (recover() and start() first, and not closed)")
            record_size = _HEADER.size + len(meta) + len(data)
            if record_size > self.segment_bytes:
                raise ValueError(f"a record of {record_size} bytes exceeds the segment size {self.segment_bytes}")
            try:
                if segment.write_offset + record_size > self.segment_bytes:
                    segment = self._roll()
                blob = encode_record(segment.sequence, meta, data)
                self._write_all(segment, blob, segment.write_offset)
            except OSError as exc:
                raise self._error(segment.path, exc) from exc
            record = JournalRecord(segment.sequence, segment.write_offset, meta, data)
            segment.write_offset += record_size
            segment.appended += 1
            segment.pending_bytes += record_size
            self._pending_bytes += record_size
        try:
            self._sync.submit(segment)
        except OSError as exc:
            # the record may or may not reach the disk; it is not acknowledged either way,
            # and the applier never hears of it: a restart applies it if it did
            raise self._error(segment.path, exc) from exc
        self._on_durable(record)
        return record

    @staticmethod
    def _write_all(segment: _Segment, blob: bytes, offset: int) -> None:
        view = memoryview(blob)
        while view:
            written = os.pwrite(segment.fd, view, offset)
            view = view[written:]
            offset += written

    @staticmethod
    def _error(path: Path, exc: OSError) -> Exception:
        if exc.errno in _FULL_ERRNOS:
            return SpoolFullError(path.parent, f"{os.strerror(exc.errno)} while writing the journal")
        return SpoolWriteError(path, exc.strerror or str(exc))

    def _roll(self) -> _Segment:
        """Seal the current segment and continue in a new one (the spare when ready)."""
        old = self._current
        assert old is not None
        old.sealed = True
        self._current = self._open_new_segment()
        if old.applied == old.appended:
            self._free(old)
        return self._current

    def _open_new_segment(self) -> _Segment:
        sequence = self._next_sequence
        self._next_sequence += 1
        path = self.directory / f"{sequence:016x}.seg"
        spare = self.directory / SPARE_NAME
        if spare.exists() and spare.stat().st_size == self.segment_bytes:
            os.replace(spare, path)
        else:
            _zero_filled(path, self.segment_bytes)
        # the name must be durable before a record in it is acknowledged
        fsync_dir(self.directory)
        segment = _Segment(sequence, path)
        self._segments[sequence] = segment
        return segment

    def prepare_spare(self) -> None:
        """Make a zero-filled spare segment if there is none (the applier calls this when idle,
        so that a roll on the C-STORE path is a rename, not a 16 MiB write)."""
        spare = self.directory / SPARE_NAME
        if spare.exists():
            return
        # not "*.tmp": the spool's clean-up of temporary files must not take it for one of its own
        temp = self.directory / f"{SPARE_NAME}.partial"
        _zero_filled(temp, self.segment_bytes)
        os.replace(temp, spare)

    # -- applying --------------------------------------------------------------------

    def applied(self, record: JournalRecord) -> None:
        """The record's object and row are durable elsewhere: its space may be reused."""
        with self._lock:
            segment = self._segments.get(record.segment)
            if segment is None:
                return
            segment.applied += 1
            segment.pending_bytes -= record.size
            self._pending_bytes -= record.size
            if segment.sealed and segment.applied >= segment.appended:
                self._free(segment)

    def _free(self, segment: _Segment) -> None:
        """A sealed segment whose records are all applied: it becomes the spare (records of its
        old sequence read as the end of a segment) or is removed."""
        self._segments.pop(segment.sequence, None)
        self._pending_bytes -= segment.pending_bytes
        segment.close()
        spare = self.directory / SPARE_NAME
        try:
            if not spare.exists() and segment.path.stat().st_size == self.segment_bytes:
                os.replace(segment.path, spare)
            else:
                segment.path.unlink()
        except OSError as exc:  # a leftover segment is applied again (idempotently) at the next start
            logger.error("cannot recycle journal segment", extra={"path": str(segment.path), "error": str(exc)})

    def close(self) -> None:
        """No more appends; segments with unapplied records stay for the next start."""
        with self._lock:
            if self._current is not None:
                self._current.sealed = True
                if self._current.applied >= self._current.appended:
                    self._free(self._current)
                self._current = None
            for segment in list(self._segments.values()):
                segment.close()
            self._segments.clear()
