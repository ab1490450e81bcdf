"""Receiver processes: the listener in child processes that share the node's listening socket.

Why processes: a C-STORE's handler holds the GIL for about a millisecond of parsing,
hashing and SQL. In the node process it competes with the scorer's Python work for
the one interpreter lock, and a store's response waited hundreds of milliseconds
while scoring saturated the CPU (docs/performance.md). In its own process a receiver
only competes for a core, and the node process lowers its own priority
(``detector.nice``) so that the kernel runs receivers first.

The node process binds the port (without SO_REUSEPORT, so a second node on the same
port fails at start instead of sharing the traffic) and hands the listening socket to
``listener.receiver_processes`` children started with the ``spawn`` method; each
accepts connections from it and runs ``listener.scp.StorageSCP`` with its own
database engine. A child tells the node of each stored instance with one byte on a
pipe (never blocking: when the pipe is full the byte is dropped, and the workers'
periodic poll finds the row anyway). A child that dies is started again; the kernel
kills the children when the node process dies (PR_SET_PDEATHSIG), so a crash of the
node never leaves receivers acknowledging stores that nobody will score.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from listener.acceptor import listening_socket
from listener.association_count import SharedAssociationCount
from listener.child_process import die_with_parent
from listener.config import NodeConfig

logger = logging.getLogger(__name__)

_READY = b"R"
_STORED = b"S"
_START_TIMEOUT_SECONDS = 60.0
_RESTART_DELAY_SECONDS = 1.0
_COALESCE_SECONDS = 0.005


def receiver_main(
    cfg: NodeConfig,
    listening: socket.socket,
    notify: Connection,
    index: int,
    parent_pid: int,
    association_counts: Any,
    association_lock: Any,
) -> None:
    """A receiver process: serve ``listening`` until SIGTERM, counting its associations in
    slot ``index`` of the node's shared ``association_counts``."""
    die_with_parent(parent_pid)
    from listener.logging_setup import configure as configure_logging
    from listener.scp import StorageSCP
    from storage.database import Database
    from storage.repository import Repository
    from storage.spool import Spool

    configure_logging(cfg.logging)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C goes to the node, which stops us
    fd = notify.fileno()
    os.set_blocking(fd, False)

    def stored() -> None:
        try:
            os.write(fd, _STORED)
        except BlockingIOError:  # the node is behind: its poll finds the row
            pass
        except OSError:  # the node is gone; PDEATHSIG ends us
            pass

    db = Database(cfg.storage.database_url)  # the node process migrated the schema
    spool = Spool(cfg.storage.spool_dir, cfg.storage.min_free_bytes)
    repo = Repository(db, node_id=spool.node_id)
    scp = StorageSCP(cfg, spool, repo, on_stored=stored, journal_name=f"receiver-{index}")
    shared = SharedAssociationCount(association_counts, association_lock, index, cfg.listener.max_associations)
    scp.start(listening=listening, shared_count=shared)
    logger.info("receiver process ready", extra={"receiver": index, "pid": os.getpid()})
    os.set_blocking(fd, True)
    os.write(fd, _READY)
    os.set_blocking(fd, False)
    while not stop.wait(1.0):
        pass
    scp.stop()
    db.dispose()
    logger.info("receiver process stopped", extra={"receiver": index})


class ReceiverPool:
    """Starts, watches and stops the receiver processes of one node."""

    def __init__(self, cfg: NodeConfig, count: int, on_stored: Callable[[], None]) -> None:
        if count < 1:
            raise ValueError("a receiver pool needs at least one process")
        self._cfg = cfg
        self._count = count
        self._on_stored = on_stored
        self._context = multiprocessing.get_context("spawn")
        self._socket: socket.socket | None = None
        self._reader: Connection | None = None
        self._writer: Connection | None = None
        self._processes: list[Any] = []
        self._stopping = threading.Event()
        self._ready = threading.Semaphore(0)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # one max_associations for the node, not one per receiver (listener.association_count)
        self._association_counts, self._association_lock = SharedAssociationCount.allocate(self._context, count)

    @property
    def address(self) -> tuple[str, int]:
        if self._socket is None:
            raise RuntimeError("the receivers are not running")
        host, port = self._socket.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        listener = self._cfg.listener
        self._socket = listening_socket(listener.host, listener.port)
        self._reader, self._writer = self._context.Pipe(duplex=False)
        self._processes = [None] * self._count
        for index in range(self._count):
            self._spawn(index)
        reader = threading.Thread(target=self._read_notifications, name="dski-receiver-notify", daemon=True)
        reader.start()
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        for _ in range(self._count):
            if not self._ready.acquire(timeout=max(0.0, deadline - time.monotonic())):
                codes = [p.exitcode for p in self._processes]
                self.stop(0)
                raise RuntimeError(f"receiver processes did not become ready (exit codes {codes}); see the log")
        watcher = threading.Thread(target=self._watch, name="dski-receiver-watch", daemon=True)
        watcher.start()
        self._threads = [reader, watcher]
        logger.info("receiver processes ready", extra={"processes": self._count, "port": self.address[1]})

    def _spawn(self, index: int) -> None:
        process = self._context.Process(
            target=receiver_main,
            args=(self._cfg, self._socket, self._writer, index, os.getpid(),
                  self._association_counts, self._association_lock),
            name=f"dski-receiver-{index}",
            daemon=False,
        )
        process.start()
        self._processes[index] = process

    def _read_notifications(self) -> None:
        assert self._reader is not None
        fd = self._reader.fileno()
        while not self._stopping.is_set():
            readable, _, _ = select.select([fd], [], [], 0.5)
            if not readable:
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            for _ in range(data.count(_READY)):
                self._ready.release()
            if _STORED in data:
                try:
                    self._on_stored()
                except Exception:  # a wake-up must never stop the reader
                    logger.exception("on_stored callback failed")
                # Stores arriving meanwhile stay in the pipe and make one wake-up: a few
                # ms late for the workers (who wait batch_wait_ms anyway) instead of a
                # context switch per store on a CPU the receivers need.
                self._stopping.wait(_COALESCE_SECONDS)

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for index, process in enumerate(self._processes):
                if process.is_alive() or self._stopping.is_set():
                    continue
                logger.error(
                    "receiver process died, starting it again",
                    extra={"receiver": index, "exitcode": process.exitcode},
                )
                time.sleep(_RESTART_DELAY_SECONDS)  # a child failing at start must not spin
                # its associations died with it; a lock it held stays held (see association_count)
                SharedAssociationCount.reset(self._association_counts, index)
                with self._lock:
                    if not self._stopping.is_set():
                        self._spawn(index)

    def established_associations(self) -> int:
        """Associations open now in all receivers together."""
        return int(sum(self._association_counts))

    def pids(self) -> list[int]:
        return [p.pid for p in self._processes if p is not None and p.pid is not None]

    def stop(self, grace_seconds: float | None = None) -> None:
        """SIGTERM every receiver (each stops accepting and drains its associations for
        ``listener.shutdown_grace_seconds``), wait, then kill what is left."""
        grace = self._cfg.listener.shutdown_grace_seconds if grace_seconds is None else grace_seconds
        with self._lock:
            self._stopping.set()
        for process in self._processes:
            if process is not None and process.is_alive():
                process.terminate()
        deadline = time.monotonic() + grace + 10
        for process in self._processes:
            if process is None:
                continue
            process.join(timeout=max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                logger.error("receiver process did not stop, killing it", extra={"pid": process.pid})
                process.kill()
                process.join(5)
        for thread in self._threads:
            thread.join(timeout=2)
        for item in (self._socket, self._reader, self._writer):
            if item is not None:
                item.close()
        self._socket = None
        logger.info("receiver processes stopped", extra={"processes": self._count})
