"""Upgrading a database made before the run lifecycle (migration 0002) and experiments (0003),
on both backends."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from encore.database.base import migrations
from encore.database.postgres import PostgresDatabase
from encore.database.sqlite import SQLiteDatabase

FINISHED = datetime(2026, 11, 20, 2, 0, tzinfo=UTC)
OLD_EVENT = "4f0d4c1e-8a55-4b8e-9d43-0c3c2b1a9e77"
OLD_ROWS = [
    ("r-published", "scheduled", "published", FINISHED.isoformat()),
    ("r-queued", "backfill", "queued", None),  # its process exited before claiming it
    ("r-running", "manual", "running", None),
]


def _first(dialect: str) -> str:
    (number, _, sql), *_ = migrations(dialect)
    assert number == 1
    return sql


def _check(db) -> None:
    published = db.get_run("r-published")
    assert published.status == "published" and published.published_at == FINISHED
    queued = db.get_run("r-queued")
    assert queued.status == "failed" and queued.error.startswith("never started")
    assert queued.finished_at is not None
    assert db.get_run("r-running").status == "running"  # reconciled by the next run start
    assert db.next_queued() is None
    # Feedback stored before experiments: a like, of no experiment; a view may follow it.
    (events,) = db.feedback_since(datetime(2026, 1, 1, tzinfo=UTC))
    (event,) = events
    assert (event.kind, event.liked_playlist_id, event.experiment_id) == ("like", 9, None)
    assert event.model_version == "old-v1"
    assert db.get_run("r-published").users_by_version is None


def test_sqlite_upgrade_from_the_first_schema(tmp_path: Path) -> None:
    path = tmp_path / "encore.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in _first("sqlite").split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at TEXT NOT NULL)"
    )
    conn.execute("INSERT INTO schema_migrations VALUES (1, '0001_init.sql', '2026-11-01')")
    for run_id, kind, status, finished in OLD_ROWS:
        conn.execute(
            "INSERT INTO runs (run_id, kind, status, created_at, finished_at) VALUES (?,?,?,?,?)",
            (run_id, kind, status, "2026-11-19T00:00:00+00:00", finished),
        )
    conn.execute(
        "INSERT INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?)",
        (OLD_EVENT, 7, "r-published", "old-v1", 9, "[9, 3]", "2026-11-19T00:00:00+00:00"),
    )
    conn.close()
    with SQLiteDatabase(path) as db:  # upgrades itself when opened
        _check(db)
        assert db.upgrade() == []


@pytest.mark.integration
def test_postgres_upgrade_from_the_first_schema(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(_first("postgres"))
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (1, '0001_init.sql')")
        for run_id, kind, status, finished in OLD_ROWS:
            conn.execute(
                "INSERT INTO runs (run_id, kind, status, finished_at) VALUES (%s, %s, %s, %s)",
                (run_id, kind, status, finished),
            )
        conn.execute(
            "INSERT INTO feedback (event_id, user_id, run_id, model_version, liked_playlist_id,"
            " shown_playlist_ids) VALUES (%s, 7, 'r-published', 'old-v1', 9, '{9,3}')",
            (OLD_EVENT,),
        )
    with PostgresDatabase(database_url) as db:
        assert db.upgrade() == [
            "0002_run_lifecycle.sql",
            "0003_experiments.sql",
            "0004_run_phases.sql",
        ]
        _check(db)
        assert db.upgrade() == []
