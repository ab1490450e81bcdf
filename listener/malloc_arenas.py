"""A cap on glibc's malloc arenas for the node and the processes it starts.

glibc gives threads that allocate at the same time arenas of their own, up to eight per
core, and each arena keeps what was freed in it. With ViT-B-16 and the node's two workers,
a cap of two arenas took about 150 MB off its steady resident memory (docs/performance.md,
Memory, session 9).
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

DEFAULT_ARENAS = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> int | None:
    """Cap this process's arenas (``mallopt``) and, through ``MALLOC_ARENA_MAX``, those of
    the child processes it starts later. An operator's own ``MALLOC_ARENA_MAX`` wins: glibc
    has already applied it to this process. Returns the cap in force, None off glibc."""
    chosen = os.environ.get("MALLOC_ARENA_MAX")
    if chosen is not None:
        return int(chosen) if chosen.isdigit() else None
    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        return None
    if applied != 1:
        logger.warning("mallopt(M_ARENA_MAX) refused", extra={"arenas": arenas})
        return None
    os.environ["MALLOC_ARENA_MAX"] = str(arenas)
    return arenas
