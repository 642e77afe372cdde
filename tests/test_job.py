"""The nightly run against real stores: atomic publish, crashes, the lock, backfill, rollback."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from encore.bundle import open_bundle, promote
from encore.database import open_database
from encore.errors import RunFailed, RunLocked
from encore.online import open_online_store
from encore.settings import Settings
from inference import load_model
from scheduler.job import rollback, run_backfill, run_full
from scheduler.run_metrics import RunMetrics
from tests.random_bundle import build_random_bundle
from tests.redis_cluster import redis_cluster as redis_cluster  # fixtures, imported by name
from tests.redis_cluster import redis_cluster_url as redis_cluster_url
from tests.support import publish_random_run

USERS = 300
COLD_EVERY = 10


@pytest.fixture(params=["sqlite", "redis+postgres", "redis-cluster+postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    extra = {}
    if request.param == "redis+postgres":
        extra = {
            "redis_url": request.getfixturevalue("redis_url"),
            "database_url": request.getfixturevalue("database_url"),
        }
    elif request.param == "redis-cluster+postgres":
        extra = {
            "redis_url": request.getfixturevalue("redis_cluster_url"),
            "redis_cluster": True,
            "database_url": request.getfixturevalue("database_url"),
        }
    settings = Settings(home=tmp_path / "home", workers=1, batch_size=64, **extra)
    with open_database(settings) as db:
        db.upgrade()
    return settings


def _all_lists(settings: Settings, run_id: str, users: int = USERS) -> list[bytes | None]:
    with open_online_store(settings) as store:
        return store.read(run_id, [7 * (code + 1) for code in range(users)])


def test_a_run_scores_every_user_and_publishes(settings: Settings) -> None:
    record = publish_random_run(settings, users=USERS, cold_every=COLD_EVERY)
    assert record.status == "published" and record.kind == "manual"
    cold = len(range(0, USERS, COLD_EVERY))
    assert (record.users_total, record.users_scored, record.cold_users) == (USERS, USERS, cold)
    assert sum(record.popularity_deciles) == (USERS - cold) * settings.top_n
    with open_online_store(settings) as store:
        assert store.current().run_id == record.run_id
        assert store.count(record.run_id) == USERS - cold
    lists = _all_lists(settings, record.run_id)
    # What the pool wrote is exactly what the model gives for those users in this process.
    model = load_model(open_bundle(settings.bundles_dir, "random-v1"), top_n=settings.top_n)
    expected = model.score(range(USERS))
    by_user = dict(zip(expected.user_ids.tolist(), expected.payloads, strict=True))
    for code, payload in enumerate(lists):
        assert payload == by_user.get(7 * (code + 1)), f"user code {code}"
    assert lists[0] is None and lists[1] is not None  # code 0 is cold


def test_a_reader_polling_during_a_run_sees_only_complete_runs(settings: Settings) -> None:
    first = publish_random_run(settings, users=USERS, cold_every=COLD_EVERY)
    build_random_bundle(
        settings.bundles_dir,
        users=USERS,
        playlists=120,
        candidates=20,
        dim=16,
        cold_every=COLD_EVERY,
        version="random-v2",
        seed=1,
    )
    done = threading.Event()
    errors: list[BaseException] = []

    def second_run() -> None:
        try:
            run_full(settings)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            done.set()

    seen: dict[str, int] = {}
    warm = USERS - len(range(0, USERS, COLD_EVERY))
    worker = threading.Thread(target=second_run)
    worker.start()
    with open_online_store(settings) as store:
        while not done.is_set() or len(seen) < 2:
            current = store.current()
            lists = store.read(current.run_id, [7 * (code + 1) for code in range(USERS)])
            present = sum(payload is not None for payload in lists)
            assert present == warm, f"run {current.run_id} served with {present}/{warm} lists"
            seen[current.run_id] = seen.get(current.run_id, 0) + 1
            if done.is_set() and len(seen) < 2:
                break
    worker.join()
    assert not errors, errors
    assert first.run_id in seen and len(seen) == 2


def test_a_run_killed_before_its_flip_leaves_the_previous_run_served(
    settings: Settings,
) -> None:
    first = publish_random_run(settings, users=USERS, cold_every=COLD_EVERY)
    before = _all_lists(settings, first.run_id)
    build_random_bundle(
        settings.bundles_dir,
        users=20_000,
        playlists=500,
        candidates=50,
        dim=32,
        version="random-big",
        seed=2,
    )
    env = {
        **os.environ,
        "ENCORE_HOME": str(settings.home),
        "ENCORE_WORKERS": "1",
        "ENCORE_BATCH_SIZE": "100",
        "ENCORE_REDIS_URL": settings.redis_url or "",
        "ENCORE_DATABASE_URL": settings.database_url or "",
    }
    env = {k: v for k, v in env.items() if v != ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "encore", "run"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        run_id = _wait_for_partial_write(settings, process, first.run_id)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run's process and its workers
        process.wait()
    with open_online_store(settings) as store:
        assert store.current().run_id == first.run_id
    assert _all_lists(settings, first.run_id) == before
    with open_database(settings) as db:
        assert db.get_run(run_id).status == "running"  # it died without a word
    # The next run finds the dead run's record under the lock and closes it.
    promote(settings.bundles_dir, "random-v1")
    third = run_full(settings)
    with open_database(settings) as db:
        dead = db.get_run(run_id)
    assert dead.status == "failed" and "interrupted" in dead.error
    assert third.status == "published"


def _wait_for_partial_write(settings: Settings, process: subprocess.Popen, old: str) -> str:
    deadline = time.monotonic() + 180
    with open_database(settings) as db, open_online_store(settings) as store:
        while time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before it could be killed"
            running = [r for r in db.list_runs() if r.status == "running"]
            if running and store.count(running[0].run_id) > 0:
                assert store.current().run_id == old
                return running[0].run_id
            time.sleep(0.05)
    raise AssertionError("the run never started writing")


def test_a_dead_worker_fails_the_run_cleanly(settings: Settings) -> None:
    first = publish_random_run(settings, users=USERS, cold_every=COLD_EVERY)
    build_random_bundle(
        settings.bundles_dir,
        users=5000,
        playlists=200,
        candidates=20,
        dim=16,
        version="random-v3",
        seed=3,
    )
    killed = []

    def kill_a_worker(stage: str, done: int, total: int) -> None:
        if done > 0 and not killed:
            child = multiprocessing.active_children()[0]
            os.kill(child.pid, signal.SIGKILL)
            killed.append(child.pid)

    metrics = RunMetrics(CollectorRegistry())
    with pytest.raises(RunFailed, match="worker_died"):
        run_full(settings, progress=kill_a_worker, metrics=metrics)
    assert killed
    with open_database(settings) as db:
        failed = db.list_runs(limit=1)[0]
    assert failed.status == "failed" and failed.error.startswith("worker_died")
    assert failed.finished_at is not None
    with open_online_store(settings) as store:
        assert store.current().run_id == first.run_id
        assert store.run_info(failed.run_id) is None  # its keyspace was discarded
    assert metrics.failures.labels("worker_died")._value.get() == 1


def test_a_second_concurrent_run_is_refused_by_the_lock(settings: Settings) -> None:
    build_random_bundle(settings.bundles_dir, users=50, playlists=30, candidates=5, dim=8)
    metrics = RunMetrics(CollectorRegistry())
    with (
        open_database(settings) as db,
        db.run_lock("someone-else"),
        pytest.raises(RunLocked, match="another run holds the run lock"),
    ):
        run_full(settings, metrics=metrics)
    assert metrics.lock_contention._value.get() == 1
    with open_database(settings) as db:
        refused = db.list_runs(limit=1)[0]
    assert refused.status == "failed" and "run lock" in refused.error
    with open_online_store(settings) as store:
        assert store.current() is None


def test_backfill_of_a_subset_is_idempotent_and_leaves_others_untouched(
    settings: Settings,
) -> None:
    first = publish_random_run(settings, users=USERS, cold_every=COLD_EVERY)
    before = _all_lists(settings, first.run_id)
    subset = [7 * (code + 1) for code in (1, 2, 3, 10)]  # code 10 is cold
    with open_online_store(settings) as store:
        store.delete_users(first.run_id, subset[:2])  # lost lists the backfill restores
        store.write_batch(first.run_id, [subset[2]], [b"[1]"])  # a stale list
        store.write_batch(first.run_id, [subset[3]], [b"[2]"])  # a cold user with a list
    for _ in range(2):
        record = run_backfill(settings, [*subset, 999_999_999])
        assert record.status == "published" and record.kind == "backfill"
        assert record.target_run_id == first.run_id
        assert record.users_total == 4 and record.cold_users == 1
        assert _all_lists(settings, first.run_id) == before
    with open_online_store(settings) as store:
        assert store.current().run_id == first.run_id


def test_rollback_restores_the_previous_run(settings: Settings) -> None:
    first = publish_random_run(settings, users=USERS, cold_every=COLD_EVERY)
    build_random_bundle(
        settings.bundles_dir,
        users=USERS,
        playlists=120,
        candidates=20,
        dim=16,
        cold_every=COLD_EVERY,
        version="random-v2",
        seed=1,
    )
    second = run_full(settings)
    assert second.drift_score is not None and second.drift_score >= 0
    assert _all_lists(settings, second.run_id) != _all_lists(settings, first.run_id)
    rollback(settings, first.run_id)
    with open_online_store(settings) as store:
        current = store.current()
    assert current.run_id == first.run_id and current.model_version == "random-v1"
