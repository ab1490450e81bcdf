"""A decode function for ``DecodePool`` tests that crashes or hangs its process on request.

In a module of its own because a spawned decoding process imports it by name.
"""

from __future__ import annotations

import os
import signal
import time

from detector.pixels import DecodeLimits
from listener.spool_decode import DecodeFailure, SpoolDecoded, decode_outcome

CRASH_SUFFIX = ".crash"
HANG_SUFFIX = ".hang"


def decode_or_crash(path: str, source: str, limits: DecodeLimits) -> SpoolDecoded | DecodeFailure:
    """``decode_outcome``, except that a path ending in ``.crash`` kills the process with
    SIGSEGV and one ending in ``.hang`` never returns, as a pixel decoder's bug on hostile
    data might."""
    if path.endswith(CRASH_SUFFIX):
        os.kill(os.getpid(), signal.SIGSEGV)
    if path.endswith(HANG_SUFFIX):
        while True:
            time.sleep(1)
    return decode_outcome(path, source, limits)
