"""The latency path of the scheduler: a queued report is dispatched at once, a series
is completed when it goes idle, and a request during a running pass is not lost."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

from listener.config import DispatchConfig, NodeConfig, ProcessingConfig
from listener.scheduler import Jobs, NodeScheduler, _CompletionTimer


class _Repo:
    """Just enough repository for the two jobs: one ready group, an outbox of due reports."""

    def __init__(self) -> None:
        self.groups: list = []
        self.due: list = []
        self.claims: list[float] = []

    def ready_groups(self, idle_seconds, scope):
        groups, self.groups = self.groups, []
        return groups

    def claim_due_reports(self, now, limit):
        self.claims.append(time.monotonic())
        due, self.due = self.due, []
        return due

    def requeue_in_progress(self, older, max_attempts):
        return 0


def _cfg(idle: float = 0.3, poll: float = 30, dispatch_every: float = 30) -> NodeConfig:
    return NodeConfig(
        processing=ProcessingConfig(series_idle_seconds=idle, poll_interval_seconds=poll),
        dispatch=DispatchConfig(interval_seconds=dispatch_every),
    )


def _wait_for(condition, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def test_completion_timer_fires_once_after_the_newest_store():
    fired: list[float] = []
    timer = _CompletionTimer(0.2, lambda: fired.append(time.monotonic()))
    timer.start()
    try:
        time.sleep(0.3)
        assert fired == []  # no store, no run
        start = time.monotonic()
        for _ in range(5):  # a series arriving: each store restarts the wait
            last = time.monotonic()  # read before note_store reads the clock: fired is >= last + 0.2
            timer.note_store()
            time.sleep(0.05)
        assert _wait_for(lambda: len(fired) == 1)
        assert fired[0] - last >= 0.2  # measured from the newest store, however long the sleeps took
        assert fired[0] - start >= 0.4
        time.sleep(0.4)
        assert len(fired) == 1  # once per burst
        timer.note_store()
        assert _wait_for(lambda: len(fired) == 2)
    finally:
        timer.stop()


def test_request_during_a_pass_runs_one_more_pass():
    jobs = Jobs(_cfg(), _Repo(), spool=None, dispatcher=SimpleNamespace())
    passes: list[int] = []

    def body() -> int:
        passes.append(1)
        if len(passes) == 1:
            jobs.request("dispatch")  # arrives while this pass runs
        return 1

    assert jobs._repeat("dispatch", body) == 2
    assert len(passes) == 2


def test_a_running_pass_is_visible_so_run_now_does_not_start_a_second_one():
    """APScheduler refuses a second concurrent run and logs a warning: run_now must only ask for a round."""
    jobs = Jobs(_cfg(), _Repo(), spool=None, dispatcher=SimpleNamespace())
    seen: list[bool] = []

    def body() -> int:
        seen.append(jobs.is_running("dispatch"))
        return 0

    assert not jobs.is_running("dispatch")
    jobs._repeat("dispatch", body)
    assert seen == [True] and not jobs.is_running("dispatch") and not jobs.is_running("retention")


def test_queued_report_brings_dispatch_forward():
    repo = _Repo()
    jobs = Jobs(_cfg(dispatch_every=30), repo, spool=None, dispatcher=SimpleNamespace())
    jobs._report_group = lambda group: 1  # type: ignore[method-assign]  # one report queued
    scheduler = NodeScheduler(jobs)
    scheduler.start()
    try:
        time.sleep(0.2)
        claims_before = len(repo.claims)
        repo.groups = [SimpleNamespace(study_instance_uid="1.2", series_instance_uid="1.2.3", instance_ids=(1,))]
        queued_at = time.monotonic()
        assert jobs.complete_series() == 1
        # the 30 s period would not run it: the request did, within milliseconds
        assert _wait_for(lambda: len(repo.claims) > claims_before, timeout=2.0)
        assert repo.claims[-1] - queued_at < 1.0
    finally:
        scheduler.shutdown()


def test_store_brings_completion_forward_to_the_idle_moment():
    repo = _Repo()
    calls: list[float] = []
    real = repo.ready_groups

    def ready_groups(idle_seconds, scope):
        calls.append(time.monotonic())
        return real(idle_seconds, scope)

    repo.ready_groups = ready_groups  # type: ignore[method-assign]
    jobs = Jobs(_cfg(idle=0.3, poll=30), repo, spool=None, dispatcher=SimpleNamespace())
    scheduler = NodeScheduler(jobs)
    scheduler.start()
    try:
        time.sleep(0.2)
        before = len(calls)
        scheduler.note_store()
        stored_at = time.monotonic()
        assert _wait_for(lambda: len(calls) > before, timeout=3.0)
        delay = calls[-1] - stored_at
        assert 0.29 <= delay < 1.5, delay  # idle (0.3 s) + margin, not the 30 s period
    finally:
        scheduler.shutdown()


def test_run_now_on_a_stopped_scheduler_is_harmless():
    jobs = Jobs(_cfg(), _Repo(), spool=None, dispatcher=SimpleNamespace())
    scheduler = NodeScheduler(jobs)
    scheduler.run_now("dispatch")  # not started: only the request flag
    scheduler.start()
    scheduler.shutdown()
    scheduler.run_now("dispatch")
    scheduler.note_store()
    assert not any(t.name == "dski-completion-timer" and t.is_alive() for t in threading.enumerate())
