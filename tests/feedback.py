"""Shared by the feedback tests (test_api_feedback.py, test_feedback_export.py and
test_faults_postgres.py): a valid feedback event for a backend's published run, the server's
counts of feedback outcomes, and an outage of the backend's database for real: Postgres refusing
connections, or the embedded SQLite database's write lock held by another process."""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any

import psycopg

from tests.api_support import Backend, sample
from tests.conftest import DATABASE_URL


def new_event(backend: Backend, **values: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "user_id": 14,
        "run_id": backend.record.run_id,
        "liked_playlist_id": 3,
        "shown_playlist_ids": [5, 3, 9],
        **values,
    }


def outcomes() -> dict[str, float]:
    return {
        outcome: sample("encore_feedback_events_total", outcome=outcome)
        for outcome in ("stored", "duplicate", "failed")
    }


def increase(before: dict[str, float]) -> dict[str, float]:
    return {k: v - before[k] for k, v in outcomes().items()}


def _postgres_admin() -> psycopg.Connection:
    return psycopg.connect(
        psycopg.conninfo.make_conninfo(DATABASE_URL, dbname="postgres"), autocommit=True
    )


class _Outage:
    """Makes the backend's database unreachable for real, then brings it back."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.lock: sqlite3.Connection | None = None

    def start(self) -> None:
        if self.backend.settings.database_url:
            name = psycopg.conninfo.conninfo_to_dict(self.backend.settings.database_url)["dbname"]
            with _postgres_admin() as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    (name,),
                )
        else:
            # The embedded database cannot be stopped; another process holding its write lock
            # past the server's busy timeout is the same failure for a writer.
            self.lock = sqlite3.connect(
                self.backend.settings.sqlite_database_path, isolation_level=None
            )
            self.lock.execute("BEGIN EXCLUSIVE")

    def stop(self) -> None:
        if self.backend.settings.database_url:
            name = psycopg.conninfo.conninfo_to_dict(self.backend.settings.database_url)["dbname"]
            with _postgres_admin() as admin:
                admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        elif self.lock is not None:
            self.lock.execute("ROLLBACK")
            self.lock.close()
            self.lock = None
