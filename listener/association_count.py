"""One node-wide ``listener.max_associations`` across the receiver processes.

Each receiver process (``listener.receivers``) runs its own acceptor, and the kernel
hands every new connection to whichever process is waiting in accept(). A limit
counted per process would let N receivers hold N times the configured number of
associations; the limit an administrator sets is for the node.

The counts live in shared memory, one slot per receiver process: a process only
ever writes its own slot (so a dead process's count is simply reset by the parent
before it starts the replacement), and admitting reads the sum under a lock shared
by all receivers. A process killed inside that lock's few microseconds would leave
it held; admitting then stops waiting after ``_LOCK_TIMEOUT_SECONDS`` and decides on
the sum read without the lock, which two receivers racing for the last slot could
both see as free. That fallback exceeds the limit by at most one association per
other receiver, and only once the lock is already lost; it never refuses service.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["SharedAssociationCount"]

_LOCK_TIMEOUT_SECONDS = 0.5


class SharedAssociationCount:
    """The established associations of one receiver process, checked against the node's limit."""

    def __init__(self, counts: Any, lock: Any, index: int, limit: int) -> None:
        """``counts``: a shared ``RawArray('i', processes)``; ``lock``: a multiprocessing lock
        shared by every receiver; ``index``: this process's slot."""
        if not 0 <= index < len(counts):
            raise ValueError(f"receiver index {index} outside the {len(counts)} shared slots")
        if limit < 1:
            raise ValueError(f"max_associations must be at least 1, got {limit}")
        self._counts = counts
        self._lock = lock
        self._index = index
        self.limit = limit

    @staticmethod
    def allocate(context: Any, processes: int) -> tuple[Any, Any]:
        """Shared slots (all zero) and their lock, made by the parent before it starts the receivers."""
        return context.RawArray("i", processes), context.Lock()

    def try_admit(self) -> bool:
        """Count one more association of this process if the node is below its limit."""
        locked = self._lock.acquire(timeout=_LOCK_TIMEOUT_SECONDS)
        if not locked:
            logger.error(
                "association count lock not released by another receiver; admitting on an unlocked count",
                extra={"receiver": self._index},
            )
        try:
            if sum(self._counts) >= self.limit:
                return False
            self._counts[self._index] += 1
            return True
        finally:
            if locked:
                self._lock.release()

    def release(self) -> None:
        """One association of this process ended. Only this process writes its slot: no lock."""
        if self._counts[self._index] > 0:
            self._counts[self._index] -= 1

    @staticmethod
    def reset(counts: Any, index: int) -> None:
        """Forget the associations of a receiver process that died (the parent, before restarting it)."""
        counts[index] = 0
