"""Shared by the HTTP API's tests (the ``test_api_*`` modules, the feedback tests and the fault
tests): a published run on either pair of stores, the app pointed at it, and how its answers
look.

Publishing a run starts a scoring pool, so each module publishes once per backend (the
module-scoped ``backend`` fixture, with settings built explicitly) and every test opens its own
app on it through ``TestClient`` used as a context manager, so the lifespan runs. A module uses
the two fixtures by importing them by name (``from tests.api_support import api as api``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from encore.database import RunRecord, open_database
from encore.online import RunInfo, open_online_store
from encore.settings import Settings, get_settings
from model_server.app import create_app
from tests.conftest import store_env
from tests.support import publish_random_run

BACKENDS = [
    pytest.param("redis+postgres", marks=pytest.mark.integration, id="redis+postgres"),
    pytest.param("sqlite", id="sqlite"),
]
MAX_ID = 2**63 - 1
VERSION = "random-v1"
TOP_N = 20  # Settings.top_n default: what each run stores per user


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------


@dataclass
class Backend:
    kind: str
    settings: Settings
    record: RunRecord | None = None  # the published run's record
    run: RunInfo | None = None  # the published run, as the online store has it

    @property
    def env(self) -> dict[str, str]:
        env = {
            "ENCORE_HOME": str(self.settings.home),
            "ENCORE_WORKERS": "2",
            "ENCORE_REDIS_PREFIX": self.settings.redis_prefix,
        }
        if self.settings.redis_url:
            env["ENCORE_REDIS_URL"] = self.settings.redis_url
        if self.settings.database_url:
            env["ENCORE_DATABASE_URL"] = self.settings.database_url
        return env

    def lists(self, user_ids: list[int]) -> dict[int, list[int] | None]:
        """The lists the online store holds for these users in the published run."""
        with open_online_store(self.settings) as store:
            payloads = store.read(self.run.run_id, user_ids)
        return {
            user: json.loads(payload) if payload is not None else None
            for user, payload in zip(user_ids, payloads, strict=True)
        }

    @property
    def fallback(self) -> list[int]:
        return json.loads(self.run.fallback)

    def feedback_rows(self) -> dict[str, dict[str, Any]]:
        """Every stored feedback row, read with the database's own client, by event id."""
        if self.settings.database_url:
            import psycopg
            from psycopg.rows import dict_row

            with psycopg.connect(self.settings.database_url, row_factory=dict_row) as conn:
                rows = conn.execute("SELECT * FROM feedback").fetchall()
            for row in rows:
                row["event_id"] = str(row["event_id"])
        else:
            conn = sqlite3.connect(self.settings.sqlite_database_path)
            conn.row_factory = sqlite3.Row
            try:
                rows = [dict(r) for r in conn.execute("SELECT * FROM feedback")]
            finally:
                conn.close()
            for row in rows:
                row["shown_playlist_ids"] = json.loads(row["shown_playlist_ids"])
                row["created_at"] = datetime.fromisoformat(row["created_at"])
        return {row["event_id"]: row for row in rows}


@contextmanager
def published_backend(kind: str, home: Path) -> Iterator[Backend]:
    """A backend of ``kind`` with the random bundle's run published (2 scoring processes)."""
    with store_env(kind) as env:
        database_url = env.get("ENCORE_DATABASE_URL")
        settings = Settings(
            home=home,
            redis_url=env.get("ENCORE_REDIS_URL"),
            redis_prefix=env.get("ENCORE_REDIS_PREFIX", "encore"),
            database_url=database_url,
            workers=2,
            _env_file=None,
        )
        if database_url:
            with open_database(settings) as db:
                db.upgrade()  # what `encore db upgrade` does
        record = publish_random_run(settings)
        with open_online_store(settings) as store:
            run = store.current()
        assert record.status == "published" and run.run_id == record.run_id
        yield Backend(kind, settings, record, run)


def use_backend(monkeypatch: pytest.MonkeyPatch, backend: Backend, **env: str) -> None:
    """Point the process's settings (ENCORE_*) at the backend, plus any extra settings."""
    for name, value in {**backend.env, **env}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()


def sample(name: str, **labels: str) -> float:
    """A sample of the process's default registry (where the model server's metrics live)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def served_counts() -> tuple[float, float]:
    return (
        sample("encore_users_served_total", source="batch"),
        sample("encore_users_served_total", source="fallback"),
    )


def error_detail(response) -> Any:
    """The JSON error body's detail (4xx and 5xx answers are JSON, never a traceback)."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert "detail" in body, body
    return body["detail"]


def validation_errors(response) -> list[dict]:
    """FastAPI's 422 body: a list of errors naming where (loc), what (type) and why (msg)."""
    assert response.status_code == 422, response.text
    detail = error_detail(response)
    assert isinstance(detail, list) and detail, detail
    for error in detail:
        assert error["msg"] and error["type"] and error["loc"], error
    return detail


# --------------------------------------------------------------------------------------
# The fixtures: one published run per backend for each module that imports them
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Backend]:
    with published_backend(request.param, tmp_path_factory.mktemp("api") / "home") as b:
        yield b


@pytest.fixture
def api(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    use_backend(monkeypatch, backend)
    with TestClient(create_app()) as client:
        yield client
