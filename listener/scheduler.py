"""Periodic jobs of the node (APScheduler, one background thread pool).

- ``complete_series``: groups idle for ``series_idle_seconds`` -> SR built from the
  source headers kept with the verdicts (else read from the spool; with several nodes
  on one database a series may have been received by several nodes) -> written to ``reports_dir`` -> one outbox row per
  destination (pending);
- ``dispatch``: due outbox rows -> C-STORE -> sent, or retrying with backoff, or dead;
- ``retention``: spool files of delivered instances are deleted;
- ``requeue_stuck``: instances / reports left in analysing / sending too long go back.

Every job reads its work from the database and keeps nothing between runs, so a
restart resumes where the last one stopped. ``max_instances=1`` and
``coalesce=True`` keep one run of a job at a time, however slow it is.

The periods are the fallback; the two jobs on the latency path also run on demand:

- a report queued by ``complete_series`` brings ``dispatch`` forward to now (the C-STORE
  starts within milliseconds instead of up to ``dispatch.interval_seconds`` later);
- every stored instance restarts a timer (:class:`_CompletionTimer`) that brings
  ``complete_series`` forward to the moment the newest store is ``series_idle_seconds``
  old, when its series becomes ready, instead of up to ``poll_interval_seconds`` later.

A request that arrives while the job is already running is not lost: the running job
goes round once more before it returns (``Jobs.request``).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from pydicom import dcmread

from listener.config import NodeConfig
from listener.dispatch import Dispatcher
from listener.report import (
    SOURCE_TAGS,
    AlgorithmInfo,
    ReportError,
    ReportItem,
    build_report,
    report_order_key,
    warm_up,
    write_report,
)
from storage.errors import DatabaseUnavailableError, InvalidTransitionError, NotFoundError, SpoolError

logger = logging.getLogger(__name__)

# An instance claimed this many times without a result (its worker died each time) is failed.
MAX_ANALYSIS_ATTEMPTS = 3
_DISPATCH_BATCH = 20
_RETENTION_BATCH = 1000
# the completion timer fires this long after the newest store is series_idle_seconds old
# (received_at is stamped before the store's callback, so the series is ready by then)
_COMPLETION_MARGIN_SECONDS = 0.02


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Jobs:
    """The job bodies, callable directly (tests, ``dski`` one-shot commands) or by the scheduler."""

    def __init__(self, cfg: NodeConfig, repo: Any, spool: Any, dispatcher: Dispatcher) -> None:
        self.cfg = cfg
        self.repo = repo
        self.spool = spool
        self.dispatcher = dispatcher
        # groups whose SR cannot be built, keyed with their instance ids: reported once, not every tick
        self._broken: dict[tuple[str, str | None], tuple[int, ...]] = {}
        # called (from the completion job's thread) when a report has been queued; the
        # scheduler sets it to bring the dispatch job forward
        self.on_report_queued: Callable[[], None] | None = None
        # set by request(): the job, if running, goes round once more before returning
        self._again = {"complete_series": threading.Event(), "dispatch": threading.Event()}
        # set while a pass of the job runs: run_now then only asks for another round, because
        # APScheduler would refuse (and log a warning for) a second concurrent run
        self._running = {job: threading.Event() for job in self._again}

    def request(self, job_id: str) -> None:
        """Ask for one more pass of ``job_id`` (only what a running pass would miss:
        the scheduler starts the next pass; see :meth:`NodeScheduler.run_now`)."""
        again = self._again.get(job_id)
        if again is not None:
            again.set()

    def is_running(self, job_id: str) -> bool:
        running = self._running.get(job_id)
        return running is not None and running.is_set()

    def _repeat(self, job_id: str, body: Callable[[], int]) -> int:
        again, running = self._again[job_id], self._running[job_id]
        done = 0
        while True:
            running.set()
            try:
                while True:
                    again.clear()
                    done += body()
                    if not again.is_set():
                        break
            finally:
                running.clear()
            # a request that saw the pass running just before it ended must not wait for the period
            if not again.is_set():
                return done

    # -- series completion ----------------------------------------------------------

    def complete_series(self) -> int:
        """Build and queue the SR of every ready group; returns the number of SRs queued."""
        return self._repeat("complete_series", self._complete_series_once)

    def _complete_series_once(self) -> int:
        processing = self.cfg.processing
        queued = 0
        for group in self.repo.ready_groups(processing.series_idle_seconds, processing.report_scope):
            key = (group.study_instance_uid, group.series_instance_uid)
            if self._broken.get(key) == group.instance_ids:
                continue
            try:
                queued_now = self._report_group(group)
                queued += queued_now
                self._broken.pop(key, None)
            except (ReportError, OSError, SpoolError, ValueError) as exc:
                self._broken[key] = group.instance_ids
                logger.error(
                    "cannot build report",
                    extra={
                        "study_instance_uid": group.study_instance_uid,
                        "series_instance_uid": group.series_instance_uid,
                        "error": str(exc),
                    },
                )
                continue
            if queued_now:
                self._report_queued()
        return queued

    def _report_queued(self) -> None:
        callback = self.on_report_queued
        if callback is None:
            return
        try:
            callback()
        except Exception:
            logger.exception("could not bring the dispatch job forward")

    def _report_group(self, group: Any) -> int:
        records = self.repo.instances_for(group.instance_ids)
        verdicts = self.repo.verdicts_for(group.instance_ids)
        stored_headers = self.repo.source_headers(group.instance_ids)
        items: list[ReportItem] = []
        used: list[int] = []
        sources: list[Any] = []
        for record in records:
            verdict = verdicts.get(record.id)
            if verdict is None:
                continue
            stored = stored_headers.get(record.id)
            if stored is not None:
                source: Any = stored
            elif record.spool_path is None:
                raise ReportError(f"instance {record.id} ({record.sop_instance_uid}): spool file already deleted")
            else:
                source = self.spool.resolve(record.spool_path)
            # only what the report reads from every image: a third of the parsing
            header = _read_header(source, SOURCE_TAGS)
            items.append(ReportItem(dataset=header, score=verdict.score, label=verdict.label, threshold=verdict.threshold))
            used.append(record.id)
            sources.append(source)
        if not items:
            return 0
        # the report copies the patient and study from its first image: that one whole
        first = min(range(len(items)), key=lambda i: report_order_key(items[i].dataset))
        items[first] = dataclasses.replace(items[first], dataset=_read_header(sources[first], None))
        # normally one model version per group; after a model upgrade mid-series, the newest wins
        newest = max((verdicts[i] for i in used), key=lambda v: (v.created_at or _utcnow(), v.id))
        versions = Counter(verdicts[i].model_version for i in used)
        if len(versions) > 1:
            logger.warning("series scored by several model versions", extra={"versions": dict(versions)})
        algorithm = AlgorithmInfo(name=newest.bundle_name, version=newest.bundle_version, model_version=newest.model_version)
        sr = build_report(items, algorithm=algorithm, cfg=self.cfg.report, scope=self.cfg.processing.report_scope)
        path = write_report(sr, self.cfg.storage.reports_dir)
        suspected = sum(1 for item in items if item.label == "fake")
        max_score = max(item.score for item in items)
        queued = 0
        for dest in self.cfg.dispatch.destinations:
            report_id = self.repo.create_report(
                group=group,
                sop_instance_uid=str(sr.SOPInstanceUID),
                series_instance_uid=str(sr.SeriesInstanceUID),
                destination=dest.name,
                path=str(path),
                instance_ids=used,
                instance_count=len(items),
                suspected_count=suspected,
                max_score=max_score,
            )
            if report_id is not None:
                queued += 1
        if not self.cfg.dispatch.destinations:
            logger.warning("no dispatch destination configured: report written but not queued", extra={"path": str(path)})
        logger.info(
            "report queued",
            extra={
                "sop_instance_uid": str(sr.SOPInstanceUID),
                "study_instance_uid": group.study_instance_uid,
                "series_instance_uid": group.series_instance_uid,
                "images": len(items),
                "suspected": suspected,
                "path": str(path),
            },
        )
        return queued

    # -- dispatch --------------------------------------------------------------------------

    def dispatch(self) -> int:
        """Send every due report; returns the number delivered."""
        return self._repeat("dispatch", self._dispatch_once)

    def _dispatch_once(self) -> int:
        delivered = 0
        while True:
            reports = self.repo.claim_due_reports(_utcnow(), _DISPATCH_BATCH)
            if not reports:
                return delivered
            for report in reports:
                delivered += self._send(report)
            if len(reports) < _DISPATCH_BATCH:
                return delivered

    def _send(self, report: Any) -> int:
        try:
            dest = self.dispatcher.destination(report.destination)
        except KeyError as exc:
            self.repo.mark_report_failed(report.id, str(exc), None)
            return 0
        result = self.dispatcher.deliver(report.path, dest)
        if result.ok:
            self.repo.mark_report_sent(report.id)
            return 1
        when = self.dispatcher.next_attempt(report.attempts + 1, _utcnow())
        status = self.repo.mark_report_failed(report.id, result.error or "unknown error", when)
        logger.warning(
            "report not delivered",
            extra={"report_id": report.id, "destination": dest.name, "status": status, "next_attempt_at": when},
        )
        return 0

    # -- retention -----------------------------------------------------------------------------

    def retention(self) -> int:
        """Delete spool files no longer needed; returns the number deleted."""
        policy = self.cfg.retention
        if not policy.delete_spool_after_delivery:
            return 0
        before = _utcnow() - timedelta(seconds=policy.keep_seconds_after_delivery)
        deleted = 0
        for instance_id, path in self.repo.spool_files_to_delete(before, limit=_RETENTION_BATCH):
            try:
                self.spool.delete(path)
            except SpoolError as exc:
                logger.error("cannot delete spool file", extra={"instance_id": instance_id, "error": str(exc)})
                continue
            try:
                self.repo.mark_spool_deleted(instance_id)
            except NotFoundError:
                continue
            deleted += 1
        if deleted:
            logger.info("spool files deleted", extra={"count": deleted})
        return deleted

    # -- stuck work --------------------------------------------------------------------------

    def requeue_stuck(self) -> int:
        older = timedelta(seconds=self.cfg.processing.stuck_after_seconds)
        return self.repo.requeue_in_progress(older, max_attempts=MAX_ANALYSIS_ATTEMPTS)


def _read_header(source: Any, tags: Sequence[str] | None) -> Any:
    """The header of a stored instance (bytes kept with the verdicts, or a spool path)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    return dcmread(source, stop_before_pixels=True, specific_tags=list(tags) if tags is not None else None)


def _guarded(name: str, body: Any) -> Any:
    def run() -> None:
        try:
            body()
        except DatabaseUnavailableError as exc:
            logger.error("job skipped: database unavailable", extra={"job": name, "error": str(exc)})
        except InvalidTransitionError as exc:
            logger.warning("job raced with another writer", extra={"job": name, "error": str(exc)})
        except Exception:
            logger.exception("job failed", extra={"job": name})

    run.__name__ = name
    return run


class NodeScheduler:
    """The BackgroundScheduler with the node's four jobs."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        cfg = jobs.cfg
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=4)},
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None},
            timezone=timezone.utc,
        )
        plan = [
            ("complete_series", jobs.complete_series, cfg.processing.poll_interval_seconds),
            ("dispatch", jobs.dispatch, cfg.dispatch.interval_seconds),
            ("retention", jobs.retention, cfg.retention.interval_seconds),
            ("requeue_stuck", jobs.requeue_stuck, max(cfg.processing.stuck_after_seconds / 4, 1.0)),
        ]
        for name, body, seconds in plan:
            self._scheduler.add_job(_guarded(name, body), "interval", seconds=seconds, id=name, name=name)
        jobs.on_report_queued = lambda: self.run_now("dispatch")
        self._completion_timer = _CompletionTimer(
            cfg.processing.series_idle_seconds + _COMPLETION_MARGIN_SECONDS, lambda: self.run_now("complete_series")
        )

    def start(self) -> None:
        try:
            warm_up()  # the first report of the process would otherwise load highdicom's tables
        except Exception:
            logger.warning("report warm-up failed", exc_info=True)
        self._scheduler.start()
        self._completion_timer.start()

    def note_store(self) -> None:
        """An instance was stored (the SCP's callback): its series may be ready idle seconds from now."""
        self._completion_timer.note_store()

    def run_now(self, job_id: str) -> None:
        """Bring a job's next run forward to now (e.g. dispatch after ``dski outbox retry``).

        If the job is running, the running pass goes round once more instead (APScheduler
        would skip a second concurrent run)."""
        self.jobs.request(job_id)
        if not self._scheduler.running or self.jobs.is_running(job_id):
            return
        try:
            self._scheduler.modify_job(job_id, next_run_time=_utcnow())
        except Exception:  # e.g. JobLookupError while shutting down
            logger.debug("cannot bring job forward", extra={"job": job_id}, exc_info=True)

    def shutdown(self) -> None:
        """Stop scheduling and wait for running jobs to finish (a send in progress completes)."""
        self._completion_timer.stop()
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)


class _CompletionTimer:
    """Calls ``fire`` once ``delay`` seconds have passed since the newest ``note_store``.

    ``note_store`` runs on the SCP's thread for every stored instance, so it only takes
    a lock and reads the monotonic clock; the waiting happens on this timer's own
    thread. One timer for all series: a series that goes quiet while another keeps
    arriving waits for the completion job's period, as before.
    """

    def __init__(self, delay: float, fire: Callable[[], None]) -> None:
        self._delay = delay
        self._fire = fire
        self._lock = threading.Lock()
        self._newest: float | None = None  # monotonic time of the newest store not yet fired for
        self._event = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="dski-completion-timer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped = True
        self._event.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def note_store(self) -> None:
        with self._lock:
            idle = self._newest is None
            self._newest = time.monotonic()
        if idle:
            self._event.set()

    def _run(self) -> None:
        while not self._stopped:
            with self._lock:
                newest = self._newest
            if newest is None:
                self._event.wait()
                self._event.clear()
                continue
            remaining = newest + self._delay - time.monotonic()
            if remaining > 0:
                self._event.wait(remaining)
                self._event.clear()
                continue
            with self._lock:
                if self._newest != newest:
                    continue  # a newer store came in meanwhile: wait for it instead
                self._newest = None
            try:
                self._fire()
            except Exception:
                logger.exception("completion timer failed")
