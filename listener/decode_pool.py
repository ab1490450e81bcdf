"""Decoding processes: the scoring workers' reading and decoding, beside the model.

Why processes: reading a spool file and decoding its pixels (pydicom's parse, the pixel
decoders, windowing) is Python that holds the interpreter lock, and it was more than half
of a worker's time per image (docs/performance.md); a second worker thread gained little
because the two shared that lock. ``detector.decode_processes`` children (``spawn``, so
that no model is copied) do this part, ``listener.spool_decode.decode_outcome``, and send
back frames as numpy arrays; the worker then makes the model's views and scores.

A crash in a pixel decoder (C code, fed data from the network) then ends a decoding
process, not the node. The objects that were being decoded when it died are decoded
again, each alone in a fresh process of its own, so that only the object that crashes
that process too is marked failed, with that reason; the pool itself is started again.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from detector.pixels import DecodeLimits
from listener.child_process import die_with_parent
from listener.spool_decode import DecodeFailure, SpoolDecoded, decode_outcome

__all__ = ["CRASH_REASON", "DecodeFunction", "DecodeJob", "DecodePool"]

logger = logging.getLogger(__name__)

CRASH_REASON = "the decoding process died while decoding this object (a crash in a pixel data decoder)"
_START_TIMEOUT_SECONDS = 60.0


# what a decoding process runs per job: a module-level function, sent by name
DecodeFunction = Callable[[str, str, DecodeLimits], SpoolDecoded | DecodeFailure]


@dataclass(frozen=True)
class DecodeJob:
    path: str    # the spool file
    source: str  # names the object in failure reasons, e.g. "SOP 1.2.3"


def _child_start(parent_pid: int, pids: Any) -> None:
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C goes to the node, which stops us
    pids.put(os.getpid())  # so that the node can stop a process whose decoding hangs


def _ready() -> int:
    return os.getpid()


class _Executor:
    """A ``ProcessPoolExecutor`` and the pids of its processes, which it does not expose."""

    def __init__(self, context: Any, processes: int) -> None:
        self._announced = context.SimpleQueue()
        self._pids: set[int] = set()
        self.pool = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=context,
            initializer=_child_start,
            initargs=(os.getpid(), self._announced),
        )

    def kill(self) -> None:
        """SIGKILL every process it started: the executor then counts as broken."""
        while not self._announced.empty():
            self._pids.add(self._announced.get())
        for pid in self._pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def shutdown(self, *, wait: bool) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=True)
        self._announced.close()


class DecodePool:
    """``processes`` decoding processes shared by the node's worker threads.

    ``timeout_seconds`` bounds the decoding of one object: a batch still decoding after
    that many seconds per object and process is taken as hung, its processes are killed,
    and its unfinished objects are decoded again each alone under that limit; one that
    exceeds it alone is marked failed.
    """

    def __init__(
        self, processes: int, *, timeout_seconds: float = 120.0, decode: DecodeFunction = decode_outcome
    ) -> None:
        if processes < 1:
            raise ValueError("a decoding pool needs at least one process")
        if timeout_seconds <= 0:
            raise ValueError("the decoding time limit must be positive")
        self._processes = processes
        self._timeout = timeout_seconds
        self._decode = decode
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._executor: _Executor | None = None
        self._generation = 0

    def start(self) -> None:
        """Start the processes and wait until each has imported what it needs, so that the
        first series does not wait for that."""
        with self._lock:
            if self._executor is None:
                self._executor = _Executor(self._context, self._processes)
            executor = self._executor
        # every submit to a spawn pool without an idle process starts one, up to the limit
        pids = [executor.pool.submit(_ready) for _ in range(self._processes)]
        started = {f.result(timeout=_START_TIMEOUT_SECONDS) for f in pids}
        logger.info("decoding processes ready", extra={"processes": self._processes, "pids": sorted(started)})

    def close(self, *, wait: bool = True) -> None:
        """Stop the processes: after their current objects, or at once (``wait=False``, e.g.
        when a worker thread is still stuck in a decoding)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            if not wait:
                executor.kill()
            executor.shutdown(wait=wait)
            logger.info("decoding processes stopped", extra={"processes": self._processes})

    def decode(self, jobs: Sequence[DecodeJob], limits: DecodeLimits) -> list[SpoolDecoded | DecodeFailure]:
        """Each job's decoded file or failure, in order; the jobs run in parallel."""
        executor, generation = self._current()
        futures: list[Future[SpoolDecoded | DecodeFailure] | None] = []
        for job in jobs:
            try:
                futures.append(executor.pool.submit(self._decode, job.path, job.source, limits))
            except BrokenProcessPool:  # broken by another worker's batch meanwhile
                futures.append(None)
        # the limit is per object: a process decodes its share of the batch one after the other
        deadline = time.monotonic() + self._timeout * math.ceil(len(jobs) / self._processes)
        results: list[SpoolDecoded | DecodeFailure | None] = []
        killed = False
        for future in futures:
            try:
                # once killed, the pending futures end with BrokenProcessPool: wait for that
                remaining = None if killed else max(0.0, deadline - time.monotonic())
                results.append(None if future is None else future.result(timeout=remaining))
            except BrokenProcessPool:
                results.append(None)
            except TimeoutError:
                logger.error(
                    "decoding hangs; stopping the decoding processes",
                    extra={"objects": len(jobs), "timeout_seconds": self._timeout},
                )
                executor.kill()
                killed = True
                results.append(None)
        suspects = [i for i, result in enumerate(results) if result is None]
        if suspects:
            logger.error(
                "decoding processes died or were stopped; decoding their objects again one by one",
                extra={"objects": len(suspects), "sources": [jobs[i].source for i in suspects]},
            )
            self._replace(generation)
            for i in suspects:
                results[i] = self._decode_alone(jobs[i], limits)
        return [r for r in results if r is not None]

    # -- internals -----------------------------------------------------------------

    def _current(self) -> tuple[_Executor, int]:
        with self._lock:
            if self._executor is None:
                raise RuntimeError("the decoding pool is not running")
            return self._executor, self._generation

    def _replace(self, generation: int) -> None:
        """A fresh executor instead of the broken one, once per breakage however many
        worker threads saw it."""
        with self._lock:
            if self._executor is None or generation != self._generation:
                return
            broken, self._executor = self._executor, _Executor(self._context, self._processes)
            self._generation += 1
        broken.kill()  # a process of it may still hang in a decoder
        broken.shutdown(wait=False)

    def _decode_alone(self, job: DecodeJob, limits: DecodeLimits) -> SpoolDecoded | DecodeFailure:
        """``job`` in a process of its own: whether it is the one that crashes or hangs is
        then certain."""
        executor = _Executor(self._context, 1)
        try:
            # started first, so that the time limit is the decoding's alone
            executor.pool.submit(_ready).result(timeout=_START_TIMEOUT_SECONDS)
        except (BrokenProcessPool, TimeoutError) as exc:
            executor.kill()
            executor.shutdown(wait=False)
            raise RuntimeError(f"a decoding process did not start: {type(exc).__name__}") from exc
        try:
            return executor.pool.submit(self._decode, job.path, job.source, limits).result(timeout=self._timeout)
        except BrokenProcessPool:
            logger.error("object crashed a decoding process", extra={"source": job.source, "path": job.path})
            return DecodeFailure(CRASH_REASON)
        except TimeoutError:
            logger.error("object hangs a decoding process", extra={"source": job.source, "path": job.path})
            return DecodeFailure(f"decoding took longer than {self._timeout:g} s; the decoding process was stopped")
        finally:
            executor.kill()
            executor.shutdown(wait=False)
