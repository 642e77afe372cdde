"""Shared fixtures. Tests that need Redis or Postgres use ENCORE_REDIS_URL / ENCORE_DATABASE_URL
(defaults: loopback). Without the server they skip with a reason; under CI=true they fail."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REDIS_URL = os.environ.get("ENCORE_REDIS_URL", "redis://127.0.0.1:6379/0")
DATABASE_URL = os.environ.get("ENCORE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
LASTFM = Path(__file__).resolve().parents[2] / "shared" / "data" / "lastfm-2k"
IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable ({exc}); set the URL or start the server"
    if IN_CI:
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test gets its own ENCORE_HOME and no inherited store URLs."""
    from encore.settings import get_settings

    monkeypatch.setenv("ENCORE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ENCORE_REDIS_URL", raising=False)
    monkeypatch.delenv("ENCORE_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@contextmanager
def redis_prefix() -> Iterator[str]:
    """A key prefix of its own on the real Redis; its keys are unlinked afterwards.

    Nothing is flushed: other tests, or other users of the server, keep their keys.
    """
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        _unavailable(f"Redis at {REDIS_URL}", exc)
    prefix = f"encore-test-{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        for keys in _batched(client.scan_iter(f"{prefix}:*", count=1000), 1000):
            client.unlink(*keys)
        client.close()


@pytest.fixture
def redis_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real Redis, with a key prefix of this test's own (ENCORE_REDIS_PREFIX)."""
    from encore.settings import get_settings

    with redis_prefix() as prefix:
        monkeypatch.setenv("ENCORE_REDIS_PREFIX", prefix)
        get_settings.cache_clear()
        yield REDIS_URL


def _batched(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextmanager
def fresh_database() -> Iterator[str]:
    """A fresh, schema-less database on the real Postgres, dropped afterwards."""
    import psycopg

    name = f"encore_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(DATABASE_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        _unavailable(f"Postgres at {DATABASE_URL}", exc)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield psycopg.conninfo.make_conninfo(DATABASE_URL, dbname=name)
    finally:
        with psycopg.connect(DATABASE_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def store_env(kind: str) -> Iterator[dict[str, str]]:
    """The ENCORE_ store settings of a stack: ``"sqlite"`` (the embedded default, none) or
    real servers: a Redis key prefix and a Postgres database of its own, dropped afterwards."""
    if kind == "sqlite":
        yield {}
        return
    with redis_prefix() as prefix, fresh_database() as database_url:
        yield {
            "ENCORE_REDIS_URL": REDIS_URL,
            "ENCORE_REDIS_PREFIX": prefix,
            "ENCORE_DATABASE_URL": database_url,
        }


@pytest.fixture
def database_url() -> Iterator[str]:
    """A real Postgres: a fresh schema-less database per test, dropped afterwards."""
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def lastfm() -> Path:
    if not (LASTFM / "user_artists.dat").exists():
        pytest.skip(f"the Last.fm data set is not at {LASTFM}")
    return LASTFM
