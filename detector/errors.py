"""Typed errors of the detector library.

Every error names the input it is about (a file, a SOP instance, a bundle
folder, a checkpoint) and the reason, so that a log line or a ``failed``
instance row is enough to understand what went wrong.  The errors pickle
cleanly (``__reduce__``) because they can cross process boundaries, e.g.
from data-loader workers during training.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "CheckpointError",
    "DetectorError",
    "ImageTooLargeError",
    "NoPixelDataError",
    "PreprocessError",
    "UnsupportedPixelDataError",
]


class DetectorError(Exception):
    """Root of every error raised by the detector library."""


class PreprocessError(DetectorError):
    """An image could not be turned into model input.

    ``source`` is the file path or ``"SOP <uid>"``; ``reason`` says why.
    """

    def __init__(self, source: str, reason: str) -> None:
        self.source = str(source)
        self.reason = str(reason)
        super().__init__(f"{self.source}: {self.reason}")

    def __reduce__(self):  # type: ignore[override]
        return (type(self), (self.source, self.reason))


class UnsupportedPixelDataError(PreprocessError):
    """Pixel data in a form this node cannot decode (transfer syntax, missing
    decoder plugin, photometric interpretation, bit depth, header values)."""


class ImageTooLargeError(PreprocessError):
    """The header declares more samples than the configured limit; nothing was decoded."""


class NoPixelDataError(PreprocessError):
    """The object carries no pixel data at all."""


class BundleError(DetectorError):
    """A model bundle folder is missing, incomplete or inconsistent."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # type: ignore[override]
        return (type(self), (self.path, self.reason))


class CheckpointError(DetectorError):
    """A checkpoint file is missing or its sha256 does not match the recorded one."""

    def __init__(
        self,
        path: object,
        reason: str,
        expected_sha256: str | None = None,
        actual_sha256: str | None = None,
    ) -> None:
        self.path = str(path)
        self.reason = str(reason)
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256
        super().__init__(
            f"{self.path}: {self.reason} "
            f"(expected sha256 {expected_sha256 or 'unknown'}, actual sha256 {actual_sha256 or 'unknown'})"
        )

    def __reduce__(self):  # type: ignore[override]
        return (type(self), (self.path, self.reason, self.expected_sha256, self.actual_sha256))
