"""POST /v1/feedback over both pairs of stores: durable before the answer, idempotent by event
id, refused whole when wrong, 503 (and never a 2xx) when the database is down; and
`encore feedback export`, which reads what it stored back as Parquet."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from encore.cli import app as cli
from encore.database import RunRecord, open_database
from model_server.app import create_app
from tests.api_support import (
    BACKENDS,
    MAX_ID,
    VERSION,
    Backend,
    error_detail,
    published_backend,
    sample,
    use_backend,
    validation_errors,
)
from tests.conftest import DATABASE_URL

# Clocks of the test and of the database may differ a little (a remote Postgres); a wrong
# time zone or a missing timestamp would be off by hours.
CLOCK_SLACK = timedelta(seconds=60)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Backend]:
    with published_backend(request.param, tmp_path_factory.mktemp("feedback") / "home") as b:
        yield b


@pytest.fixture
def api(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    use_backend(monkeypatch, backend)
    with TestClient(create_app()) as client:
        yield client


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


def test_an_event_is_stored_with_its_model_version_and_time(api, backend):
    before = outcomes()
    likes = sample("encore_feedback_likes_total", model_version=VERSION)
    impressions = sample("encore_feedback_impressions_total", model_version=VERSION)
    event = new_event(backend, user_id=MAX_ID, liked_playlist_id=MAX_ID)
    sent_at = datetime.now(UTC)

    response = api.post("/v1/feedback", json=event)

    answered_at = datetime.now(UTC)
    assert response.status_code == 201, response.text
    assert response.json() == {
        "event_id": event["event_id"],
        "status": "stored",
        "model_version": VERSION,
    }
    # Durable before the answer: the row is there, read with the database's own client.
    row = backend.feedback_rows()[event["event_id"]]
    created_at = row.pop("created_at")
    assert row == {
        "event_id": event["event_id"],
        "user_id": MAX_ID,
        "run_id": backend.record.run_id,
        "model_version": VERSION,  # the served run's model, looked up by the server
        "liked_playlist_id": MAX_ID,
        "shown_playlist_ids": [5, 3, 9],
    }
    assert created_at.tzinfo is not None
    assert sent_at - CLOCK_SLACK <= created_at <= answered_at + CLOCK_SLACK
    assert increase(before) == {"stored": 1, "duplicate": 0, "failed": 0}
    assert sample("encore_feedback_likes_total", model_version=VERSION) == likes + 1
    assert sample("encore_feedback_impressions_total", model_version=VERSION) == impressions + 3


def test_the_model_version_comes_from_the_run_the_event_names(api, backend):
    with open_database(backend.settings) as db:
        db.create_run(
            RunRecord(
                "older-run",
                "manual",
                "published",
                model_version="old-v0",
                created_at=datetime.now(UTC),
            )
        )
    older = new_event(backend, run_id="older-run", shown_playlist_ids=[])
    unknown = new_event(backend, run_id="no-such-run")
    assert api.post("/v1/feedback", json=older).json()["model_version"] == "old-v0"
    assert api.post("/v1/feedback", json=unknown).json()["model_version"] is None
    rows = backend.feedback_rows()
    assert rows[older["event_id"]]["model_version"] == "old-v0"
    assert rows[older["event_id"]]["shown_playlist_ids"] == []
    assert rows[unknown["event_id"]]["model_version"] is None


def test_the_same_event_again_is_200_and_stored_once(api, backend):
    event = new_event(backend)
    assert api.post("/v1/feedback", json=event).status_code == 201
    stored = backend.feedback_rows()[event["event_id"]]
    before = outcomes()
    retries = [
        event,
        dict(reversed(event.items())),  # the same event, keys in another order
        event | {"event_id": event["event_id"].upper()},  # the same uuid, spelled otherwise
        event | {"event_id": uuid.UUID(event["event_id"]).urn},
    ]
    for retry in retries:
        response = api.post("/v1/feedback", json=retry)
        assert response.status_code == 200, (retry, response.text)
        assert response.json() == {
            "event_id": event["event_id"],
            "status": "duplicate",
            "model_version": VERSION,
        }
    assert backend.feedback_rows()[event["event_id"]] == stored  # not rewritten
    assert increase(before) == {"stored": 0, "duplicate": len(retries), "failed": 0}


def test_the_same_event_id_for_another_event_is_409(api, backend):
    event = new_event(backend)
    assert api.post("/v1/feedback", json=event).status_code == 201
    stored = backend.feedback_rows()[event["event_id"]]
    before = outcomes()
    for change in (
        {"liked_playlist_id": 4},
        {"user_id": 21},
        {"run_id": "another-run"},
        {"shown_playlist_ids": [3, 5, 9]},  # the same playlists, shown in another order
        {"shown_playlist_ids": [5, 3]},
    ):
        response = api.post("/v1/feedback", json=event | change)
        assert response.status_code == 409, (change, response.text)
        assert event["event_id"] in error_detail(response)
    assert backend.feedback_rows()[event["event_id"]] == stored
    assert increase(before) == {"stored": 0, "duplicate": 0, "failed": 0}


def test_concurrent_retries_store_each_event_exactly_once(api, backend):
    events = [new_event(backend, user_id=7 * (i + 1), liked_playlist_id=i) for i in range(4)]
    threads = 20
    barrier = threading.Barrier(threads)
    before = outcomes()

    def post(i: int) -> tuple[str, int]:
        event = events[i % len(events)]
        barrier.wait()  # all at once: the retries race each other into the database
        return event["event_id"], api.post("/v1/feedback", json=event).status_code

    with ThreadPoolExecutor(threads) as pool:
        answers = list(pool.map(post, range(threads)))

    rows = backend.feedback_rows()
    for event in events:
        statuses = sorted(status for event_id, status in answers if event_id == event["event_id"])
        assert statuses == [200] * (threads // len(events) - 1) + [201], statuses
        assert rows[event["event_id"]]["liked_playlist_id"] == event["liked_playlist_id"]
    assert increase(before) == {"stored": 4, "duplicate": threads - 4, "failed": 0}
    assert _count_rows(backend, [e["event_id"] for e in events]) == len(events)


def _count_rows(backend: Backend, event_ids: list[str]) -> int:
    """Rows with these ids, counted by the database itself (not through a dict)."""
    if backend.settings.database_url:
        with psycopg.connect(backend.settings.database_url) as conn:
            return conn.execute(
                "SELECT count(*) FROM feedback WHERE event_id = ANY(%s::uuid[])", (event_ids,)
            ).fetchone()[0]
    conn = sqlite3.connect(backend.settings.sqlite_database_path)
    try:
        marks = ",".join("?" * len(event_ids))
        return conn.execute(
            f"SELECT count(*) FROM feedback WHERE event_id IN ({marks})", event_ids
        ).fetchone()[0]
    finally:
        conn.close()


# Each: what to change in a valid event, then the field the 422 must name.
BAD_EVENTS = {
    "event id not a uuid": ({"event_id": "event-1"}, "event_id"),
    "event id a number": ({"event_id": 12}, "event_id"),
    "no event id": ({"event_id": None}, "event_id"),
    "user id a string": ({"user_id": "14"}, "user_id"),
    "user id a float": ({"user_id": 1.5}, "user_id"),
    "user id a boolean": ({"user_id": True}, "user_id"),
    "negative user id": ({"user_id": -14}, "user_id"),
    "user id over 2^63-1": ({"user_id": 2**63}, "user_id"),
    "liked id a string": ({"liked_playlist_id": "3"}, "liked_playlist_id"),
    "negative liked id": ({"liked_playlist_id": -3}, "liked_playlist_id"),
    "liked id over 2^63-1": ({"liked_playlist_id": 2**63}, "liked_playlist_id"),
    "shown id a string": ({"shown_playlist_ids": [5, "3"]}, "shown_playlist_ids"),
    "shown id a boolean": ({"shown_playlist_ids": [False]}, "shown_playlist_ids"),
    "negative shown id": ({"shown_playlist_ids": [5, -3]}, "shown_playlist_ids"),
    "shown ids not a list": ({"shown_playlist_ids": "5,3"}, "shown_playlist_ids"),
    "1001 shown ids": ({"shown_playlist_ids": list(range(1001))}, "shown_playlist_ids"),
    "empty run id": ({"run_id": ""}, "run_id"),
    "run id a number": ({"run_id": 5}, "run_id"),
    "run id too long": ({"run_id": "r" * 129}, "run_id"),
    "unknown field": ({"liked": 3}, "liked"),
}


@pytest.mark.parametrize(("change", "field"), list(BAD_EVENTS.values()), ids=list(BAD_EVENTS))
def test_a_bad_event_is_422_naming_the_field_and_writes_nothing(api, backend, change, field):
    rows = backend.feedback_rows()
    before = outcomes()
    event = {k: v for k, v in (new_event(backend) | change).items() if v is not None}
    response = api.post("/v1/feedback", json=event)
    errors = validation_errors(response)
    assert any(field in e["loc"] for e in errors), errors
    assert backend.feedback_rows() == rows
    assert increase(before) == {"stored": 0, "duplicate": 0, "failed": 0}


@pytest.mark.parametrize(
    "raw",
    [b'{"event_id": "', b"", b"null", b"[]", b'{"user_id": 14}'],
    ids=["truncated", "empty", "null", "list", "incomplete"],
)
def test_a_malformed_body_is_422_and_writes_nothing(api, backend, raw):
    rows = backend.feedback_rows()
    response = api.post("/v1/feedback", content=raw, headers={"content-type": "application/json"})
    validation_errors(response)
    assert backend.feedback_rows() == rows


# --------------------------------------------------------------------------------------
# The database down
# --------------------------------------------------------------------------------------


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


@pytest.mark.slow
def test_feedback_is_503_and_never_2xx_while_the_database_is_down(api, backend):
    event = new_event(backend)
    outage = _Outage(backend)
    before = outcomes()
    outage.start()
    try:
        response = api.post("/v1/feedback", json=event)
        assert response.status_code == 503, response.text
        assert error_detail(response)
        assert response.json()["component"] == "database"
        assert int(response.headers["retry-after"]) >= 1
        assert increase(before)["failed"] == 1
        assert increase(before)["stored"] == 0
        if backend.settings.database_url:
            # Still in rotation: recommendations are served; the body says what is down.
            ready = api.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["status"] == "degraded", ready.json()
            assert ready.json()["checks"]["database"]["ok"] is False
            assert any("database" in p for p in ready.json()["problems"]), ready.json()
            runs = api.get("/v1/runs")
            assert runs.status_code == 503, runs.text
            assert runs.json()["component"] == "database"
        # Recommendations do not need the database.
        served = api.post("/v1/recommendations", json={"user_ids": [14]})
        assert served.status_code == 200, served.text
    finally:
        outage.stop()

    # The 503 was true: the event is not there...
    assert event["event_id"] not in backend.feedback_rows()
    # ...so the client's retry stores it (once the server has its connections back).
    deadline = time.monotonic() + 120
    while True:
        response = api.post("/v1/feedback", json=event)
        if response.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert response.status_code == 201, response.text
    assert backend.feedback_rows()[event["event_id"]]["model_version"] == VERSION
    assert api.get("/readyz").json()["status"] == "ready"


# --------------------------------------------------------------------------------------
# encore feedback export
# --------------------------------------------------------------------------------------


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
                "INSERT INTO feedback VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (*values, event["shown_playlist_ids"], created_at),
            )
    else:
        conn = sqlite3.connect(backend.settings.sqlite_database_path)
        try:
            with conn:
                conn.execute(
                    "INSERT INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?)",
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
