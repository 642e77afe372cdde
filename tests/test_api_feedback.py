"""POST /v1/feedback over both pairs of stores: durable before the answer, idempotent by event
id, refused whole when wrong, and 503 (never a 2xx) when the database is down, the client's
retry stored once it is back. `encore feedback export` is in test_feedback_export.py."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from encore.database import RunRecord, open_database
from tests.api_support import MAX_ID, VERSION, Backend, error_detail, sample, validation_errors
from tests.api_support import api as api  # fixtures, imported by name
from tests.api_support import backend as backend
from tests.feedback import _Outage, increase, new_event, outcomes

# Clocks of the test and of the database may differ a little (a remote Postgres); a wrong
# time zone or a missing timestamp would be off by hours.
CLOCK_SLACK = timedelta(seconds=60)


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
        "kind": "like",
        "status": "stored",
        "model_version": VERSION,
        "experiment_id": None,  # no experiment ran
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
        "kind": "like",
        "experiment_id": None,
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
            "kind": "like",
            "status": "duplicate",
            "model_version": VERSION,
            "experiment_id": None,
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
