"""DIMSE statuses the listener answers with (PS3.4 B.2.3 for the Storage service, PS3.7 C)."""

from __future__ import annotations

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000  # not a parseable DICOM dataset
STATUS_BAD_UID = 0xC001  # a required UID is missing or malformed
STATUS_UID_MISMATCH = 0xC002  # the dataset's SOP Instance UID differs from the command's
STATUS_TOO_LARGE = 0xC003  # Rows x Columns x Frames over listener.max_pixels
STATUS_PROCESSING_FAILURE = 0x0110
