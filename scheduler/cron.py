"""`encore scheduler`: the nightly run on an APScheduler cron trigger, plus its metrics port."""

from __future__ import annotations

import logging
import signal
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from prometheus_client import CollectorRegistry, start_http_server

from encore.database import open_database
from encore.errors import EncoreError, RunLocked
from encore.settings import Settings
from scheduler.job import run_full
from scheduler.metrics import RunMetrics

logger = logging.getLogger("encore.scheduler")

CATCH_UP_AFTER = timedelta(days=1)
JOB_ID = "nightly-run"


def nightly(settings: Settings, metrics: RunMetrics, kind: str = "scheduled") -> None:
    """One scheduled run; failures are logged and counted, never crash the scheduler."""
    try:
        run_full(settings, kind=kind, metrics=metrics)
    except RunLocked as exc:
        logger.warning("skipped: %s", exc)
    except EncoreError as exc:
        logger.error("the %s run failed: %s", kind, exc)


def needs_catch_up(settings: Settings, *, now: datetime | None = None) -> bool:
    """True when no full run was published in the last day."""
    now = now or datetime.now(UTC)
    with open_database(settings) as db:
        last = db.last_published()
    return last is None or last.finished_at is None or now - last.finished_at > CATCH_UP_AFTER


def build_scheduler(settings: Settings, metrics: RunMetrics) -> BlockingScheduler:
    scheduler = BlockingScheduler(timezone=settings.schedule_timezone)
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
    scheduler.add_job(nightly, trigger, args=(settings, metrics), **job_options)
    if needs_catch_up(settings):
        logger.info("the last published run is older than a day (or missing): catching up now")
        scheduler.add_job(
            nightly,
            args=(settings, metrics, "scheduled"),
            id="catch-up",
            next_run_time=datetime.now(UTC),
            max_instances=1,
        )
    return scheduler


def metrics_registry(settings: Settings) -> RunMetrics:
    metrics = RunMetrics(CollectorRegistry())
    metrics.add_database(lambda: open_database(settings))
    return metrics


def run_scheduler(settings: Settings) -> None:
    metrics = metrics_registry(settings)
    server, thread = start_http_server(settings.scheduler_metrics_port, registry=metrics.registry)
    scheduler = build_scheduler(settings, metrics)
    logger.info(
        "scheduler: nightly run at %s %s; metrics on :%d/metrics",
        settings.schedule_time.strftime("%H:%M"),
        settings.schedule_timezone,
        settings.scheduler_metrics_port,
    )

    def stop(signum: int, frame: object) -> None:
        logger.info("stopping the scheduler (signal %d)", signum)
        scheduler.shutdown(wait=False)

    signal.signal(signal.SIGTERM, stop)
    try:
        scheduler.start()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        thread.join(timeout=5)
