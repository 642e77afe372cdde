"""`encore scheduler`: the nightly run on an APScheduler cron trigger, the runs queued through
the API, the upkeep of the run records and keyspaces, and the scheduler's metrics port."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.base import BaseScheduler
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from prometheus_client import CollectorRegistry, start_http_server

from encore.database import open_database
from encore.errors import EncoreError, RunLocked
from encore.online import open_online_store
from encore.settings import Settings
from scheduler.job import Prepare, run_full, run_queued
from scheduler.lifecycle import maintain
from scheduler.run_metrics import RunMetrics
from scheduler.stopping import stop_on_signals

logger = logging.getLogger("encore.scheduler")

CATCH_UP_AFTER = timedelta(days=1)
JOB_ID = "nightly-run"
QUEUE_JOB_ID = "queued-runs"
UPKEEP_JOB_ID = "upkeep"
UPKEEP_EVERY = timedelta(hours=1)


@dataclass
class Jobs:
    """What the scheduler's jobs share: the settings, the metrics and the stop flag.

    ``busy`` keeps this process to one run at a time (the run lock does it across replicas):
    the nightly run waits for a queued run to end, while the queue poll skips a busy turn.
    """

    settings: Settings
    metrics: RunMetrics
    stop: threading.Event = field(default_factory=threading.Event)
    busy: threading.Lock = field(default_factory=threading.Lock)
    # With ENCORE_INTERACTIONS: ingest and refresh before scoring (wired by the CLI).
    prepare: Prepare | None = None

    def nightly(self, kind: str = "scheduled") -> None:
        """One scheduled run; failures are logged and counted, never crash the scheduler."""
        with self.busy:
            if self.stop.is_set():
                return
            try:
                run_full(
                    self.settings,
                    kind=kind,
                    metrics=self.metrics,
                    stop=self.stop,
                    prepare=self.prepare,
                )
            except RunLocked as exc:
                logger.warning("skipped: %s", exc)
            except EncoreError as exc:
                logger.error("the %s run failed: %s", kind, exc)

    def queued(self) -> None:
        """Execute the runs queued through the API (`POST /v1/runs`)."""
        if not self.busy.acquire(blocking=False):
            return
        try:
            run_queued(self.settings, metrics=self.metrics, stop=self.stop, prepare=self.prepare)
        except EncoreError as exc:
            logger.warning("could not look at the queued runs: %s", exc)
        finally:
            self.busy.release()

    def upkeep(self) -> None:
        """Reconcile the run records with the store and sweep abandoned keyspaces."""
        if not self.busy.acquire(blocking=False):
            return
        try:
            upkeep(self.settings)
        except RunLocked:
            logger.info("upkeep skipped: a run holds the lock (it reconciles when it starts)")
        except EncoreError as exc:
            logger.warning("upkeep failed: %s", exc)
        finally:
            self.busy.release()


def nightly(
    settings: Settings,
    metrics: RunMetrics,
    kind: str = "scheduled",
    *,
    prepare: Prepare | None = None,
) -> None:
    """One scheduled run, outside a scheduler (failures are logged, never raised)."""
    Jobs(settings, metrics, prepare=prepare).nightly(kind)


def upkeep(settings: Settings) -> None:
    """Under the run lock: settle unfinished records, sweep keyspaces nothing will serve."""
    with (
        open_database(settings) as db,
        open_online_store(settings) as store,
        db.run_lock("upkeep"),
    ):
        maintain(db, store, grace_seconds=settings.run_grace_seconds, me=None)


def needs_catch_up(settings: Settings, *, now: datetime | None = None) -> bool:
    """True when the served data is older than a day (or nothing was ever published).

    The age is the served run's own: after a rollback to an old run, catch-up runs too.
    """
    now = now or datetime.now(UTC)
    with open_database(settings) as db:
        last = db.last_published()
    return last is None or last.finished_at is None or now - last.finished_at > CATCH_UP_AFTER


def add_jobs(scheduler: BaseScheduler, jobs: Jobs) -> None:
    """The nightly cron job, the queue poll and the upkeep, on any APScheduler scheduler."""
    settings = jobs.settings
    trigger = CronTrigger(
        hour=settings.schedule_time.hour,
        minute=settings.schedule_time.minute,
        timezone=settings.schedule_timezone,
    )
    job_options: dict[str, Any] = {
        "id": JOB_ID,
        "coalesce": True,  # several missed nights make one run, not a burst
        "max_instances": 1,
        "misfire_grace_time": settings.misfire_grace_seconds,
        "replace_existing": True,
    }
    scheduler.add_job(jobs.nightly, trigger, **job_options)
    scheduler.add_job(
        jobs.queued,
        "interval",
        seconds=settings.queue_poll_seconds,
        id=QUEUE_JOB_ID,
        coalesce=True,
        max_instances=1,
        next_run_time=datetime.now(UTC),
    )
    scheduler.add_job(
        jobs.upkeep,
        "interval",
        seconds=UPKEEP_EVERY.total_seconds(),
        id=UPKEEP_JOB_ID,
        coalesce=True,
        max_instances=1,
        next_run_time=datetime.now(UTC),
    )


def build_scheduler(settings: Settings, jobs: Jobs) -> BlockingScheduler:
    scheduler = BlockingScheduler(timezone=settings.schedule_timezone)
    add_jobs(scheduler, jobs)
    if needs_catch_up(settings):
        logger.info("the served run is older than a day (or missing): catching up now")
        scheduler.add_job(
            jobs.nightly, id="catch-up", next_run_time=datetime.now(UTC), max_instances=1
        )
    return scheduler


def metrics_registry(settings: Settings) -> RunMetrics:
    metrics = RunMetrics(CollectorRegistry())
    metrics.add_database(lambda: open_database(settings))
    if settings.interactions is not None:
        metrics.add_ingest(
            settings.ingest_dir / "ingest.json", settings.ingest_dir.parent / "retrain.json"
        )
    return metrics


def run_scheduler(settings: Settings, *, prepare: Prepare | None = None) -> None:
    """Until SIGTERM or SIGINT; a run in progress then stops before its flip."""
    jobs = Jobs(settings, metrics_registry(settings), prepare=prepare)
    server, thread = start_http_server(
        settings.scheduler_metrics_port, registry=jobs.metrics.registry
    )
    scheduler = build_scheduler(settings, jobs)
    logger.info(
        "scheduler: nightly run at %s %s, queued runs every %.0f s; metrics on :%d/metrics",
        settings.schedule_time.strftime("%H:%M"),
        settings.schedule_timezone,
        settings.queue_poll_seconds,
        settings.scheduler_metrics_port,
    )

    def shut_down() -> None:
        # From a thread: shutdown(wait=True) waits for the job threads, which stop promptly
        # now that the flag is set, and must not block the signal handler.
        threading.Thread(target=scheduler.shutdown, kwargs={"wait": True}).start()

    try:
        with stop_on_signals(jobs.stop, then=shut_down):
            scheduler.start()
    finally:
        server.shutdown()
        thread.join(timeout=5)
    logger.info("scheduler stopped")
