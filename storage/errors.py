"""Typed errors of the storage package.

The listener maps ``SpoolFullError`` and ``DatabaseUnavailableError`` to the DICOM
out-of-resources status (0xA700); everything else is a bug or bad input.
"""

from __future__ import annotations

from pathlib import Path


class StorageError(Exception):
    """Root of every error raised by ``storage``."""


class SpoolError(StorageError):
    """A spool operation failed."""


class SpoolFullError(SpoolError):
    """Not enough free space to accept an object (checked before writing, or ENOSPC/EDQUOT while writing)."""

    def __init__(self, root: Path | str, reason: str) -> None:
        super().__init__(f"spool {root} is full: {reason}")
        self.root = str(root)
        self.reason = reason


class SpoolWriteError(SpoolError):
    """Writing a spool file failed for a reason other than a full disk (permissions, I/O error)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"cannot write spool file {path}: {reason}")
        self.path = str(path)
        self.reason = reason


class SpoolPathError(SpoolError, ValueError):
    """A path handed to the spool lies outside its root or is not a spool file."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class DatabaseUnavailableError(StorageError):
    """The database cannot be reached or cannot commit (locked past the busy timeout, disk full, server down)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"database {url} unavailable: {reason}")
        self.url = url
        self.reason = reason


class NotFoundError(StorageError, KeyError):
    """No row with this id exists."""

    def __init__(self, entity: str, entity_id: int | str) -> None:
        super().__init__(f"no {entity} with id {entity_id!r}")
        self.entity = entity
        self.entity_id = entity_id

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class InvalidTransitionError(StorageError):
    """A state change that the state machine does not allow (e.g. a verdict for an instance not being analysed)."""

    def __init__(self, entity: str, entity_id: int, from_status: str | None, to_status: str) -> None:
        super().__init__(f"{entity} {entity_id}: cannot go from {from_status!r} to {to_status!r}")
        self.entity = entity
        self.entity_id = entity_id
        self.from_status = from_status
        self.to_status = to_status
