"""A decode function for ``DecodePool`` tests that crashes its process on request.

In a module of its own because a spawned decoding process imports it by name.
"""

from __future__ import annotations

import os
import signal

from detector.pixels import DecodeLimits
from listener.spool_decode import DecodeFailure, SpoolDecoded, decode_outcome

CRASH_SUFFIX = ".crash"


def decode_or_crash(path: str, source: str, limits: DecodeLimits) -> SpoolDecoded | DecodeFailure:
    """``decode_outcome``, except that a path ending in ``.crash`` kills the process with
    SIGSEGV, as a pixel decoder's bug on hostile data would."""
    if path.endswith(CRASH_SUFFIX):
        os.kill(os.getpid(), signal.SIGSEGV)
    return decode_outcome(path, source, limits)
