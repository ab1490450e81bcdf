"""The node: every part wired together, started in order and drained on SIGTERM.

Start order (each step needs the previous one):
logging -> database schema -> spool -> reconcile spool and database -> requeue
work left in progress by a crash -> listener port (receiver processes,
``listener.receivers``) -> lower this process's priority -> detector bundle ->
workers -> scheduler -> systemd READY=1.

Stop order (SIGTERM / SIGINT): STOPPING=1 -> the listener stops accepting
associations and lets open ones finish their stores (up to
``listener.shutdown_grace_seconds``) -> workers finish their batch -> scheduler
waits for running jobs -> database closed -> exit 0. Whatever was not finished is
in the database and resumes at the next start.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import sdnotify

from listener.config import NodeConfig
from listener.dispatch import Dispatcher
from listener.logging_setup import configure as configure_logging
from listener.pipeline import Pipeline
from listener.receivers import ReceiverPool
from listener.scheduler import MAX_ANALYSIS_ATTEMPTS, Jobs, NodeScheduler
from listener.scp import StorageSCP, apply_leftover_journals
from storage.database import Database
from storage.repository import Repository
from storage.spool import Spool

logger = logging.getLogger(__name__)


def load_detector(cfg: NodeConfig) -> Any:
    import torch

    from detector.detector import Detector

    if cfg.detector.torch_threads > 0:
        torch.set_num_threads(cfg.detector.torch_threads)
    return Detector.load(
        cfg.detector.bundle,
        device=cfg.detector.device,
        batch_size=cfg.detector.batch_size,
        precision=cfg.detector.precision,
    )


def lower_priority(nice: int) -> None:
    """Raise this thread's niceness to ``nice``; threads it starts later inherit it (Linux
    sets priority per thread), which is how the workers, torch's thread pool and the
    scheduler run behind the receivers while the receivers keep theirs."""
    if nice <= 0:
        return
    try:
        current = os.getpriority(os.PRIO_PROCESS, 0)
        if nice > current:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:  # never fatal: only the ordering under load changes
        logger.warning("cannot lower the scoring priority", extra={"nice": nice, "error": str(exc)})


class Node:
    def __init__(self, config: NodeConfig, *, detector: Any = None, configure_logs: bool = True) -> None:
        self.cfg = config
        self._detector = detector
        self._configure_logs = configure_logs
        self._notifier = sdnotify.SystemdNotifier()
        self._stop_requested = threading.Event()
        self._started = False
        self.db: Database | None = None
        self.repo: Repository | None = None
        self.spool: Spool | None = None
        self.scp: StorageSCP | None = None  # the listener, when it runs in this process
        self.receivers: ReceiverPool | None = None  # or the receiver processes
        self.pipeline: Pipeline | None = None
        self.scheduler: NodeScheduler | None = None

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        if self._configure_logs:
            configure_logging(cfg.logging)
        self._notify("STATUS=starting")
        self.db = Database(cfg.storage.database_url)
        self.db.migrate()
        self.spool = Spool(cfg.storage.spool_dir, cfg.storage.min_free_bytes)
        # node_id: several nodes may share one (PostgreSQL) database; each serves the rows of its spool
        self.repo = Repository(self.db, node_id=self.spool.node_id)
        for folder in (cfg.storage.reports_dir, cfg.storage.quarantine_dir):
            Path(folder).mkdir(parents=True, exist_ok=True)
        # The listener is not running yet, so no store is between its write and its commit:
        # every file without a row is an orphan of the last crash, however young, and every
        # temporary file is a write that will never finish. Without min_age=0 an orphan of a
        # crash-restart within a minute would stay in the spool until some later start.
        # Journaled objects were acknowledged: into the spool and database before anything
        # looks for orphans, and before a listener could append to the same journal.
        applied = apply_leftover_journals(cfg, self.spool, self.repo)
        if applied:
            logger.warning("journals applied at start-up", extra={"records": applied})
        reconciled = self.repo.reconcile_spool(
            self.spool, cfg.storage.quarantine_dir, min_age=timedelta(0), temp_max_age=timedelta(0)
        )
        if reconciled.quarantined or reconciled.missing:
            logger.warning(
                "spool reconciled",
                extra={"quarantined": len(reconciled.quarantined), "missing": len(reconciled.missing)},
            )
        # nothing else of THIS node runs yet: everything of its own in analysing / sending was cut
        # short by a stop or crash (other nodes' rows are left alone: node_id scopes the requeue)
        self.repo.requeue_in_progress(None, max_attempts=MAX_ANALYSIS_ATTEMPTS)
        # Receivers first: they are started before the detector loads (so a spawn copies no
        # model) and before this process lowers its priority (children inherit niceness).
        if cfg.listener.receiver_processes:
            self.receivers = ReceiverPool(cfg, cfg.listener.receiver_processes, on_stored=self._stored)
            self.receivers.start()
        else:
            self.scp = StorageSCP(cfg, self.spool, self.repo, on_stored=self._stored)
            self.scp.start()
        lower_priority(cfg.detector.nice)
        if self._detector is None:
            self._detector = load_detector(cfg)
        self.pipeline = Pipeline(self.repo, self._detector, self.spool, cfg)
        self.pipeline.start()
        dispatcher = Dispatcher(cfg.dispatch, calling_ae=cfg.listener.ae_title)
        self.scheduler = NodeScheduler(Jobs(cfg, self.repo, self.spool, dispatcher))
        self.scheduler.start()
        self._started = True
        host, port = self.address
        logger.info("node ready", extra={"ae_title": cfg.listener.ae_title, "host": host, "port": port})
        self._notify(f"READY=1\nSTATUS=listening on {host}:{port} as {cfg.listener.ae_title}")

    @property
    def address(self) -> tuple[str, int]:
        """Where the node listens (host, port)."""
        if self.receivers is not None:
            return self.receivers.address
        if self.scp is not None:
            return self.scp.address
        raise RuntimeError("the node is not running")

    def _stored(self) -> None:
        """An instance to analyse was stored: wake the workers, start the series' idle timer."""
        if self.pipeline is not None:
            self.pipeline.wake()
        scheduler = self.scheduler
        if scheduler is not None:  # None until started (the listener starts first)
            scheduler.note_store()

    def stop(self) -> None:
        self._notify("STOPPING=1")
        logger.info("node stopping")
        if self.receivers is not None:
            self.receivers.stop()
        if self.scp is not None:
            self.scp.stop()
        if self.pipeline is not None:
            self.pipeline.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown()
        if self.db is not None:
            self.db.dispose()
        self._started = False
        logger.info("node stopped")

    def request_stop(self) -> None:
        self._stop_requested.set()

    def run_forever(self) -> int:
        """Start, serve until SIGTERM / SIGINT, drain, return the exit status (0)."""

        def on_signal(signum: int, _frame: Any) -> None:
            logger.info("signal received", extra={"signal": signal.Signals(signum).name})
            self._stop_requested.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not self._stop_requested.wait(1.0):
                pass
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return 0

    def _notify(self, state: str) -> None:
        self._notifier.notify(state)

    def __enter__(self) -> "Node":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
