"""APScheduler wiring, catch-up, the scheduler's metrics, and drift."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import numpy as np
import pytest
from apscheduler.triggers.cron import CronTrigger
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from encore.database import RunRecord, open_database
from encore.settings import Settings
from inference.lists import encode_lists, popularity_deciles
from scheduler.cron import (
    JOB_ID,
    QUEUE_JOB_ID,
    UPKEEP_JOB_ID,
    Jobs,
    build_scheduler,
    metrics_registry,
    needs_catch_up,
    nightly,
)
from scheduler.drift import compare_runs, psi
from tests.support import publish_random_run


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(
        home=tmp_path / "home",
        schedule_time=time(3, 30),
        schedule_timezone="Europe/Paris",
        misfire_grace_seconds=7200,
        workers=1,
    )
    with open_database(settings) as db:
        db.upgrade()
    return settings


def _published(settings: Settings, finished: datetime) -> None:
    with open_database(settings) as db:
        db.create_run(
            RunRecord(
                "r-old",
                "scheduled",
                "published",
                model_version="m",
                finished_at=finished,
                users_total=10,
                users_scored=10,
                cold_users=2,
                duration_seconds=3.5,
                drift_score=0.01,
                popularity_deciles=[1] * 10,
                created_at=finished,
            )
        )


def test_the_nightly_job_uses_the_configured_cron_and_options(settings: Settings) -> None:
    _published(settings, datetime.now(UTC) - timedelta(hours=2))
    scheduler = build_scheduler(settings, Jobs(settings, metrics_registry(settings)))
    job = scheduler.get_job(JOB_ID)
    assert isinstance(job.trigger, CronTrigger)
    fields = {f.name: str(f) for f in job.trigger.fields}
    assert (fields["hour"], fields["minute"]) == ("3", "30")
    assert str(job.trigger.timezone) == "Europe/Paris"
    assert job.coalesce is True and job.max_instances == 1
    assert job.misfire_grace_time == 7200
    assert scheduler.get_job("catch-up") is None  # a run finished two hours ago
    queue = scheduler.get_job(QUEUE_JOB_ID)  # runs queued through the API
    assert queue.trigger.interval.total_seconds() == settings.queue_poll_seconds
    assert queue.max_instances == 1 and queue.coalesce is True
    assert scheduler.get_job(UPKEEP_JOB_ID) is not None


@pytest.mark.parametrize("age", [None, timedelta(days=2)])
def test_a_missing_or_old_run_is_caught_up_at_start(settings: Settings, age) -> None:
    if age is not None:
        _published(settings, datetime.now(UTC) - age)
    assert needs_catch_up(settings)
    scheduler = build_scheduler(settings, Jobs(settings, metrics_registry(settings)))
    assert scheduler.get_job("catch-up") is not None


def test_metrics_describe_the_last_published_run(settings: Settings) -> None:
    finished = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)
    _published(settings, finished)
    values = _samples(metrics_registry(settings))
    assert values["encore_run_last_success_timestamp_seconds"] == finished.timestamp()
    assert values["encore_run_users_scored"] == 10
    assert values["encore_run_cold_fraction"] == pytest.approx(0.2)
    assert values["encore_run_duration_seconds"] == 3.5
    assert values["encore_run_drift_score"] == 0.01


def test_metrics_count_the_runs_waiting_in_the_queue(settings: Settings) -> None:
    assert _samples(metrics_registry(settings))["encore_runs_queued"] == 0
    first = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
    with open_database(settings) as db:
        db.enqueue_run(RunRecord("q-old", "manual", "queued", created_at=first))
        db.enqueue_run(
            RunRecord("q-new", "backfill", "queued", created_at=first + timedelta(minutes=3)),
            [7],
        )
        db.create_run(RunRecord("r-running", "manual", "running", created_at=first))
    values = _samples(metrics_registry(settings))
    assert values["encore_runs_queued"] == 2
    assert values["encore_runs_queued_oldest_timestamp_seconds"] == first.timestamp()


def _samples(metrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def test_metrics_after_a_scheduled_run(settings: Settings) -> None:
    metrics = metrics_registry(settings)
    publish_random_run(settings, users=120, cold_every=4)  # builds and promotes the bundle
    nightly(settings, metrics)
    text = generate_latest(metrics.registry).decode()
    assert 'encore_runs_total{kind="scheduled",status="published"} 1.0' in text
    assert "encore_run_users_scored 120.0" in text
    assert "encore_run_cold_users 30.0" in text
    assert 'encore_recommended_popularity_decile_bucket{le="+Inf"} 1800.0' in text  # 90 x 20
    assert "encore_batch_duration_seconds_count 1.0" in text


def test_a_failed_scheduled_run_does_not_stop_the_scheduler(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="encore.scheduler"):
        nightly(settings, metrics_registry(settings))  # no model promoted yet
    assert "no promoted model" in caplog.text
    with open_database(settings) as db:
        assert db.list_runs(limit=1)[0].status == "failed"


def test_psi_and_drift() -> None:
    same = [100] * 10
    assert psi(np.array(same), np.array(same)) == pytest.approx(0.0)
    shifted = [400, 200, 100, 100, 50, 50, 50, 20, 20, 10]
    drift = compare_runs(shifted, 10, 100, same, 10, 100)
    assert drift.decile_psi > 0.2 and drift.cold_psi == pytest.approx(0.0)
    assert drift.score == drift.decile_psi and drift.chi2_pvalue < 1e-6
    colder = compare_runs(same, 50, 100, same, 5, 100)
    assert colder.decile_psi == pytest.approx(0.0) and colder.score == colder.cold_psi > 0.5


def test_popularity_deciles_and_list_encoding() -> None:
    deciles = popularity_deciles(np.array([5, 50, 1, 40, 30, 20, 10, 2, 3, 4]))
    assert deciles.tolist() == [6, 1, 10, 2, 3, 4, 5, 9, 8, 7]
    ids = np.array([[3, 1, 2], [7, 8, -1]])
    assert encode_lists(ids, ids >= 0) == [b"[3,1,2]", b"[7,8]"]
    assert encode_lists(ids[:1], ids[:1] >= 0) == [b"[3,1,2]"]
