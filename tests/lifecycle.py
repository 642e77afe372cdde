"""Shared by the run lifecycle's tests (test_lifecycle_commit.py and test_lifecycle_faults.py):
settings on the embedded SQLite or on real Redis and Postgres (the ``settings`` and ``servers``
fixtures, imported by name), a second bundle to publish, and reads of a run's record, of the
served run and of how many lists it serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from encore.database import RunRecord, open_database
from encore.online import open_online_store
from encore.settings import Settings
from tests.random_bundle import build_random_bundle

USERS = 300


def _settings(tmp_path: Path, **extra) -> Settings:
    settings = Settings(home=tmp_path / "home", workers=1, batch_size=64, **extra)
    with open_database(settings) as db:
        db.upgrade()
    return settings


@pytest.fixture(params=["sqlite", "redis+postgres"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if request.param == "sqlite":
        return _settings(tmp_path)
    return _settings(
        tmp_path,
        redis_url=request.getfixturevalue("redis_url"),
        database_url=request.getfixturevalue("database_url"),
    )


@pytest.fixture
def servers(tmp_path: Path, redis_url: str, database_url: str) -> Settings:
    """Redis and Postgres: the faults of a database server."""
    return _settings(tmp_path, redis_url=redis_url, database_url=database_url)


def _second_bundle(settings: Settings, **size) -> None:
    options = {"users": USERS, "playlists": 120, "candidates": 20, "dim": 16, "cold_every": 10}
    build_random_bundle(settings.bundles_dir, version="random-v2", seed=1, **{**options, **size})


def _record(settings: Settings, run_id: str) -> RunRecord:
    with open_database(settings) as db:
        return db.get_run(run_id)


def _current(settings: Settings) -> str | None:
    with open_online_store(settings) as store:
        current = store.current()
    return current.run_id if current else None


def _served_lists(settings: Settings, run_id: str) -> int:
    with open_online_store(settings) as store:
        return sum(p is not None for p in store.read(run_id, [7 * (c + 1) for c in range(USERS)]))
