"""Durable spool of received DICOM objects.

An object is acknowledged to its sender only after its bytes are on disk, so
``store`` writes to a temporary name in the final folder (``O_EXCL``), fsyncs the
file, renames it atomically and fsyncs the folder. A crash leaves either the whole
file under its final name or a temporary file that ``remove_stale_temp_files``
cleans up; never a truncated ``.dcm``.

File names come from a random UUID, never from DICOM UIDs: UIDs are sender
controlled, may collide for changed objects and must not become paths.
Paths kept in the database are relative to the spool root (``SpoolEntry.path``),
so the spool can be moved.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from storage.batching import GroupCommit
from storage.errors import SpoolError, SpoolFullError, SpoolPathError, SpoolWriteError

__all__ = [
    "Spool",
    "SpoolEntry",
    "SpoolError",
    "SpoolFullError",
    "SpoolPathError",
    "SpoolWriteError",
]

logger = logging.getLogger(__name__)

SUFFIX = ".dcm"
TEMP_SUFFIX = ".tmp"
# Holds the spool's node id (see Spool.node_id); a dot file, so never taken for a spool object.
NODE_ID_FILE = ".dski-node-id"
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# what Spool.plan returns: yyyy/mm/dd/<uuid4 hex>.dcm
_PLANNED = re.compile(r"[0-9]{4}/[0-9]{2}/[0-9]{2}/[0-9a-f]{32}\.dcm")
# A streamed object has no size up front: free space is re-checked after this many bytes.
_RECHECK_BYTES = 16 * 1024 * 1024
# statvfs on every store costs more than the write of a small object. Far from the limit
# a measured free space is reused for this long, less the bytes accepted since; within
# _FREE_SPACE_MARGIN of min_free_bytes every store measures again, so the refusal point
# is exact where it matters. Another process filling the disk in between is still
# caught: ENOSPC while writing is refused the same way.
_FREE_SPACE_TTL_SECONDS = 1.0
_FREE_SPACE_MARGIN = 256 * 1024 * 1024


@dataclass(frozen=True)
class SpoolEntry:
    path: Path  # relative to the spool root: what the database stores
    sha256: str  # hex digest of the bytes written
    size: int
    absolute_path: Path | None = None  # the same file, absolute (for the caller's convenience)


def planned_path(path: str) -> bool:
    """Whether ``path`` has the form ``Spool.plan`` gives (relative, no way out of the root)."""
    return _PLANNED.fullmatch(path) is not None


def _libc_syncfs(fd: int) -> int:
    """``syncfs(fd)`` from the C library (Linux); where it is missing, ``sync()``, which
    flushes every file system and so this one too."""
    syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    if syncfs is None:  # pragma: no cover - not Linux
        os.sync()
        return 0
    return int(syncfs(fd))


def fsync_dir(path: Path) -> None:
    """fsync a folder: the entries created, renamed or removed in it become durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dirs(folders: Sequence[Path]) -> list[None]:
    """fsync each distinct folder once: makes every rename done in them so far durable."""
    for folder in dict.fromkeys(folders):
        fsync_dir(folder)
    return [None] * len(folders)


class Spool:
    """Files under ``root/<yyyy>/<mm>/<dd>/<uuid4>.dcm`` (UTC date of receipt)."""

    def __init__(self, root: Path | str, min_free_bytes: int) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must be >= 0, got {min_free_bytes}")
        self.root = Path(root).absolute()
        self.min_free_bytes = int(min_free_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self._node_id: str | None = None
        self._last_folder: Path | None = None  # the folder write_planned last made sure of
        self._free_lock = threading.Lock()
        self._free_measured: tuple[int, float] | None = None  # (free bytes, time.monotonic()) of the last statvfs
        self._accepted_since = 0  # bytes accepted since that measurement
        # concurrent stores into one folder share its fsync (storage.batching)
        self._dir_sync: GroupCommit[Path, None] = GroupCommit(_fsync_dirs)

    @property
    def node_id(self) -> str:
        """Stable identity of this spool, created on first use in ``root/.dski-node-id``.

        Several nodes sharing one database each have their own spool; this id, stamped
        on every row whose file lives here, tells a node which rows it can serve. It
        moves with the spool folder: a spool restored on another machine keeps its work.
        """
        if self._node_id is None:
            path = self.root / NODE_ID_FILE
            if not path.exists():
                temp = self.root / f".{uuid.uuid4().hex}{TEMP_SUFFIX}"
                with open(temp, "w", encoding="ascii") as fh:
                    fh.write(uuid.uuid4().hex + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                try:
                    os.link(temp, path)  # fails if another process created it first: theirs wins
                except FileExistsError:
                    pass
                finally:
                    temp.unlink()
                fsync_dir(self.root)
            value = path.read_text(encoding="ascii").strip()
            if not value or len(value) > 64:
                raise SpoolPathError(path, "node id file is empty or longer than 64 characters")
            self._node_id = value
        return self._node_id

    # -- paths ---------------------------------------------------------------

    def resolve(self, path: Path | str) -> Path:
        """Absolute path of a spool file given relative to the root (as stored) or absolute."""
        p = Path(path)
        full = p if p.is_absolute() else self.root / p
        # normpath, not resolve(): a symlinked root must not make every path look foreign
        full = Path(os.path.normpath(full))
        if not full.is_relative_to(self.root) or full == self.root:
            raise SpoolPathError(path, f"not inside the spool {self.root}")
        return full

    def relative(self, path: Path | str) -> Path:
        """The path relative to the root, the form kept in the database."""
        return self.resolve(path).relative_to(self.root)

    # -- writing -------------------------------------------------------------

    def check_free_space(self, incoming: int = 0) -> None:
        """Raise ``SpoolFullError`` when accepting ``incoming`` bytes would leave less than ``min_free_bytes``."""
        if self._far_from_limit(incoming):
            return
        try:
            free = shutil.disk_usage(self.root).free
        except OSError as exc:
            raise SpoolWriteError(self.root, f"cannot read free space: {exc.strerror or exc}") from exc
        with self._free_lock:
            self._free_measured, self._accepted_since = (free, time.monotonic()), incoming
        if free - incoming < self.min_free_bytes:
            raise SpoolFullError(
                self.root,
                f"{free} bytes free, {incoming} incoming, {self.min_free_bytes} must stay free",
            )

    def _far_from_limit(self, incoming: int) -> bool:
        """True when a recent measurement, less what was accepted since, leaves a wide margin;
        counts ``incoming`` as accepted in that case."""
        with self._free_lock:
            if self._free_measured is None:
                return False
            free, at = self._free_measured
            if time.monotonic() - at > _FREE_SPACE_TTL_SECONDS:
                return False
            if free - self._accepted_since - incoming - self.min_free_bytes < _FREE_SPACE_MARGIN:
                return False
            self._accepted_since += incoming
            return True

    def store(self, data: bytes | bytearray | memoryview | Iterable[bytes]) -> SpoolEntry:
        """Write one object durably; returns its relative path, sha256 and size.

        Raises ``SpoolFullError`` (refused before writing, or ENOSPC/EDQUOT while
        writing) and ``SpoolWriteError`` (any other OSError). In both cases no file
        is left behind.
        """
        if isinstance(data, (bytes, bytearray, memoryview)):
            chunks: Iterable[bytes] = (bytes(data) if isinstance(data, memoryview) else data,)
            incoming = len(data) if not isinstance(data, memoryview) else data.nbytes
            streamed = False
        else:
            chunks, incoming, streamed = data, 0, True
        self.check_free_space(incoming)

        now = datetime.now(timezone.utc)
        folder = self.root / f"{now:%Y}" / f"{now:%m}" / f"{now:%d}"
        name = uuid.uuid4().hex
        final = folder / f"{name}{SUFFIX}"
        temp = folder / f".{name}{SUFFIX}{TEMP_SUFFIX}"
        digest = hashlib.sha256()
        size = 0
        try:
            self._make_folder(folder)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
            try:
                since_check = 0
                for chunk in chunks:
                    view = memoryview(chunk).cast("B")
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                    digest.update(chunk)
                    size += len(chunk)
                    since_check += len(chunk)
                    if streamed and since_check >= _RECHECK_BYTES:
                        since_check = 0
                        self.check_free_space()
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
            self._dir_sync.submit(folder)
        except OSError as exc:
            self._discard(temp)
            if exc.errno in _FULL_ERRNOS:
                raise SpoolFullError(self.root, f"{os.strerror(exc.errno)} while writing {final.name}") from exc
            raise SpoolWriteError(final, exc.strerror or str(exc)) from exc
        except BaseException:
            # SpoolFullError from the re-check, or the caller's iterable failing
            self._discard(temp)
            raise
        return SpoolEntry(path=final.relative_to(self.root), sha256=digest.hexdigest(), size=size, absolute_path=final)

    # -- journaled objects (storage.journal) -----------------------------------

    def plan(self, size: int) -> Path:
        """A new object's path relative to the root, after the free-space check for ``size``
        bytes (``SpoolFullError``); nothing is written. The journal records the path, so
        that applying the record again after a crash writes the same file."""
        self.check_free_space(size)
        now = datetime.now(timezone.utc)
        # one string, parsed once: about 5 µs less than joining four parts (on the C-STORE path)
        return Path(f"{now:%Y/%m/%d}/{uuid.uuid4().hex}{SUFFIX}")

    def write_planned(self, path: Path | str, data: bytes) -> SpoolEntry:
        """Write a journaled object under its planned path, NOT synced: ``sync_filesystem``
        makes a whole batch durable with one flush. No temporary name: the journal still
        holds the bytes, so a file cut short by a crash is written again, whole, at the
        next start."""
        rel = str(path)
        if not planned_path(rel):  # journal records are read back from disk: never trust a path
            raise SpoolPathError(path, "not a path planned by Spool.plan")
        full = self.root / rel
        try:
            folder = full.parent
            if folder != self._last_folder:
                self._make_folder(folder)
                self._last_folder = folder
            fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        except OSError as exc:
            self._discard(full)
            if exc.errno in _FULL_ERRNOS:
                raise SpoolFullError(self.root, f"{os.strerror(exc.errno)} while writing {full.name}") from exc
            raise SpoolWriteError(full, exc.strerror or str(exc)) from exc
        return SpoolEntry(path=Path(rel), sha256=hashlib.sha256(data).hexdigest(), size=len(data), absolute_path=full)

    def sync_filesystem(self) -> None:
        """Make everything written to the spool's file system durable: ``syncfs(2)``, one
        journal commit and one device flush for a whole batch of files and their folders,
        where an fsync per file and folder would cost one flush each (and each flush
        delays the receive journal's own fdatasync, on the C-STORE path)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _libc_syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise SpoolWriteError(self.root, f"syncfs failed: {os.strerror(err)}")
        finally:
            os.close(fd)

    def _make_folder(self, folder: Path) -> None:
        if folder.is_dir():
            return
        created = []
        p = folder
        while not p.exists():
            created.append(p)
            p = p.parent
        folder.mkdir(parents=True, exist_ok=True)
        # a new folder's entry lives in its parent: fsync the parents so the rename survives a crash
        for p in created:
            fsync_dir(p.parent)

    @staticmethod
    def _discard(temp: Path) -> None:
        try:
            temp.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # pragma: no cover - nothing better to do than say so
            logger.error("cannot remove spool temp file", extra={"path": str(temp), "error": str(exc)})

    # -- reading and removal -------------------------------------------------

    def read(self, path: Path | str) -> bytes:
        return self.resolve(path).read_bytes()

    def exists(self, path: Path | str) -> bool:
        return self.resolve(path).is_file()

    def delete(self, path: Path | str) -> bool:
        """Remove a spool file; returns False when it was already gone."""
        full = self.resolve(path)
        try:
            full.unlink()
        except FileNotFoundError:
            return False
        return True

    def quarantine(self, path: Path | str, quarantine_dir: Path | str, reason: str) -> Path:
        """Move a spool file to ``quarantine_dir/<yyyy-mm-dd>/`` with a ``.reason.json`` beside it.

        Returns the new absolute path. The file keeps its name; the reason file
        records where it came from, when and why.
        """
        full = self.resolve(path)
        if not full.is_file():
            raise SpoolPathError(path, "no such spool file")
        now = datetime.now(timezone.utc)
        target_dir = Path(quarantine_dir).absolute() / f"{now:%Y-%m-%d}"
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / full.name
        if target.exists():
            target = target_dir / f"{full.stem}-{uuid.uuid4().hex[:8]}{full.suffix}"
        try:
            shutil.move(full, target)  # rename when on the same file system, else copy + delete
            note = {
                "source": str(full.relative_to(self.root)),
                "reason": reason,
                "at": now.isoformat(),
            }
            target.with_name(target.name + ".reason.json").write_text(json.dumps(note, indent=1), encoding="utf-8")
            fsync_dir(target_dir)
        except OSError as exc:
            raise SpoolWriteError(target, f"quarantine failed: {exc.strerror or exc}") from exc
        logger.warning("quarantined spool file", extra={"path": str(full), "to": str(target), "reason": reason})
        return target

    # -- enumeration ---------------------------------------------------------

    def iter_files(self) -> Iterator[Path]:
        """Relative paths of every finished spool file (temporary files excluded), in sorted order."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            base = Path(dirpath)
            for name in sorted(filenames):
                if name.endswith(SUFFIX) and not name.startswith("."):
                    yield (base / name).relative_to(self.root)

    def iter_temp_files(self) -> Iterator[Path]:
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                    yield (Path(dirpath) / name).relative_to(self.root)

    def remove_stale_temp_files(self, older_than_seconds: float = 3600.0) -> int:
        """Remove temporary files left by a crash; a young one may belong to a write in progress."""
        limit = time.time() - older_than_seconds
        removed = 0
        for rel in self.iter_temp_files():
            full = self.root / rel
            try:
                if full.stat().st_mtime <= limit:
                    full.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
