"""Group commit: concurrent callers of a slow durable operation share one execution.

The receive path makes two things durable per object before it answers the sender:
the spool folder entry (a directory fsync) and the ``instances`` row (a database
commit, itself an fsync of the WAL). Each costs a disk flush, and a flush costs the
same for one item as for ten. With several associations storing at once, the first
caller becomes the *leader*: it takes every item queued so far, runs the batch
operation once for all of them, and hands each waiting caller (*follower*) its own
result or the batch's exception. Callers that arrive while a batch runs queue for
the next one, whose leader is the first of them to wake.

No thread of its own (nothing to start or stop), and a lone caller runs its item
itself at once, so one association pays no hand-off. Nobody returns before the
batch that holds its item has finished, so "answered only after durable" holds for
every caller exactly as without batching.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Waiter(Generic[T, R]):
    item: T
    done: bool = False
    result: R | None = None
    error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """``submit(item)`` runs ``run_batch`` on a batch holding ``item`` and returns that item's result.

    ``run_batch`` gets the items in arrival order and returns one result per item,
    in the same order; it runs in the calling threads, one batch at a time. If it
    raises, every caller of that batch gets the exception, except where
    ``isolate_failures(exc)`` is true: then a failed batch of several items is re-run
    item by item, so that one poison item does not fail the others (only for a
    ``run_batch`` that is all or nothing, and for errors that an item can cause:
    re-running after a lock timeout would multiply the wait).
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[T]], Sequence[R]],
        *,
        isolate_failures: Callable[[BaseException], bool] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._isolate = isolate_failures
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[_Waiter[T, R]] = []
        self._running = False

    def submit(self, item: T) -> R:
        waiter: _Waiter[T, R] = _Waiter(item)
        with self._cond:
            self._pending.append(waiter)
            while self._running and not waiter.done:
                self._cond.wait()
            if not waiter.done:  # nobody runs a batch: lead one with everything queued
                self._running = True
                batch, self._pending = self._pending, []
        if not waiter.done:
            try:
                self._execute(batch)
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[return-value]

    def _execute(self, batch: list[_Waiter[T, R]]) -> None:
        """Run one batch and settle every waiter in it; never raises."""
        try:
            results = self._run_batch([w.item for w in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            for w, r in zip(batch, results):
                w.result = r
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter, who re-raises it
            if self._isolate is not None and len(batch) > 1 and self._isolate(exc):
                for w in batch:
                    self._execute([w])
                return
            for w in batch:
                w.error = exc
        finally:
            for w in batch:
                w.done = True
