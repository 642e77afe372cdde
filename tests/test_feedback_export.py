"""`encore feedback export` over both pairs of stores: the feedback events stored since a time,
oldest first, written as Parquet with every column as the database holds it (created_at in
UTC), after events posted through POST /v1/feedback and one inserted years earlier."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime
from typing import Any

import psycopg
import pyarrow.parquet as pq
from typer.testing import CliRunner

from encore.cli import app as cli
from tests.api_support import VERSION, Backend
from tests.api_support import api as api  # fixtures, imported by name
from tests.api_support import backend as backend
from tests.feedback import new_event


def _insert_old_event(backend: Backend, event: dict[str, Any], created_at: datetime) -> None:
    values = (
        event["event_id"],
        event["user_id"],
        event["run_id"],
        "old-v0",
        event["liked_playlist_id"],
    )
    if backend.settings.database_url:
        with psycopg.connect(backend.settings.database_url) as conn:
            conn.execute(
                "INSERT INTO feedback (event_id, user_id, run_id, model_version,"
                " liked_playlist_id, shown_playlist_ids, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (*values, event["shown_playlist_ids"], created_at),
            )
    else:
        conn = sqlite3.connect(backend.settings.sqlite_database_path)
        try:
            with conn:
                conn.execute(
                    "INSERT INTO feedback (event_id, user_id, run_id, model_version,"
                    " liked_playlist_id, shown_playlist_ids, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (*values, json.dumps(event["shown_playlist_ids"]), created_at.isoformat()),
                )
        finally:
            conn.close()


def test_feedback_export_writes_the_events_since_a_time_as_parquet(api, backend, tmp_path):
    old = new_event(backend, user_id=21, shown_playlist_ids=[8, 9])
    _insert_old_event(backend, old, datetime(2020, 6, 1, 12, 0, tzinfo=UTC))
    events = [
        new_event(backend, user_id=7 * (i + 1), liked_playlist_id=i + 1, shown_playlist_ids=[i])
        for i in range(3)
    ]
    for event in events:
        assert api.post("/v1/feedback", json=event).status_code == 201
    rows = backend.feedback_rows()
    runner = CliRunner()

    def export(since: str, name: str) -> list[dict[str, Any]]:
        out = tmp_path / name
        result = runner.invoke(cli, ["feedback", "export", "--since", since, "--out", str(out)])
        assert result.exit_code == 0, result.output
        table = pq.read_table(out)
        assert str(table.schema.field("created_at").type) == "timestamp[us, tz=UTC]"
        exported = table.to_pylist()
        assert f"wrote {len(exported):,} feedback events" in " ".join(result.output.split())
        return exported

    recent = export("2021-01-01T00:00:00", "recent.parquet")
    by_id = {row["event_id"]: row for row in recent}
    assert old["event_id"] not in by_id
    for event in events:
        assert by_id[event["event_id"]] == rows[event["event_id"]]  # every column, as stored
    assert by_id[events[0]["event_id"]]["model_version"] == VERSION
    times = [row["created_at"] for row in recent]
    assert times == sorted(times)  # oldest first
    assert len(recent) == len(rows) - 1  # everything but the old event

    everything = export("2020-01-01", "all.parquet")
    assert {row["event_id"] for row in everything} == set(rows)
    assert everything[0] == rows[old["event_id"]]
    assert everything[0]["created_at"] == datetime(2020, 6, 1, 12, 0, tzinfo=UTC)

    assert export("2999-01-01", "none.parquet") == []
