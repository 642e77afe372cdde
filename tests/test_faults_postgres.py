"""The API against a Postgres that fails for real (its test database made unreachable, its
connections killed, as a restart or a failover does), with Redis serving the lists.

Recommendations never need Postgres; feedback answers 503 while it is down, nothing it
acknowledged is lost, a retry of an event is stored once, and the pool comes back by itself.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg_pool import AsyncConnectionPool

from model_server.app import create_app
from tests.api_support import Backend, published_backend, use_backend
from tests.feedback import _Outage, _postgres_admin, new_event
from tests.live import live_server
from tests.load import Answer, request

pytestmark = pytest.mark.integration

ASKED = {"user_ids": [14, 21, 7]}


@pytest.fixture(scope="module")
def backend(tmp_path_factory) -> Iterator[Backend]:
    with published_backend("redis+postgres", tmp_path_factory.mktemp("pg") / "home") as b:
        yield b


def _rows_by_event(backend: Backend, event_ids: list[str]) -> dict[str, int]:
    """How many rows each event id has, counted by Postgres."""
    with psycopg.connect(backend.settings.database_url) as conn:
        rows = conn.execute(
            "SELECT event_id::text, count(*) FROM feedback WHERE event_id = ANY(%s::uuid[])"
            " GROUP BY event_id",
            (event_ids,),
        ).fetchall()
    return dict(rows)


def _kill_connections(backend: Backend) -> int:
    """End every session on the test database, as a Postgres restart does to a client.

    Waits (up to 5 s each) until the sessions are gone: a restart is over before a client
    sees it, and `pg_terminate_backend` alone only sends the signal.
    """
    name = psycopg.conninfo.conninfo_to_dict(backend.settings.database_url)["dbname"]
    with _postgres_admin() as admin:
        killed = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchone()[0]
    return killed


@pytest.mark.slow
def test_no_acknowledged_event_is_lost_to_a_postgres_outage(backend, monkeypatch):
    use_backend(monkeypatch, backend)
    outage = _Outage(backend)
    events = [new_event(backend, user_id=7 * (i + 1), liked_playlist_id=i) for i in range(48)]
    answers: list[Answer] = []
    lock = threading.Lock()
    # Each client sends two events before the outage, the rest during and after it: without
    # the gate, fast clients could be done before the database goes away.
    down = threading.Event()

    def client(mine: list[dict], url: str) -> None:
        # Like the page: the same event id on every retry, until it is acknowledged.
        for sent, event in enumerate(mine):
            if sent == 2:
                assert down.wait(timeout=120), "the outage never started"
            body = json.dumps(event).encode()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                answer = request("POST", f"{url}/v1/feedback", body, tag=event["event_id"])
                with lock:
                    answers.append(answer)
                if answer.status in (200, 201):
                    break
                time.sleep(0.2)

    def seen(statuses: set[int]) -> int:
        with lock:
            return sum(1 for a in answers if a.status in statuses)

    def wait_until(condition, what: str, timeout_seconds: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_seconds
        while not condition():
            assert time.monotonic() < deadline, f"{what} did not happen in {timeout_seconds} s"
            time.sleep(0.05)

    with live_server(create_app()) as url:
        clients = [
            threading.Thread(target=client, args=(events[i::4], url), daemon=True) for i in range(4)
        ]
        for thread in clients:
            thread.start()
        try:
            wait_until(lambda: seen({200, 201}) >= 8, "8 acknowledged events")
            outage.start()
            down.set()
            wait_until(lambda: seen({503}) >= 8, "8 answers 503 during the outage")
        finally:
            outage.stop()
        for thread in clients:
            thread.join(timeout=240)
        assert not any(thread.is_alive() for thread in clients), "clients did not finish"

    statuses = Counter(a.status for a in answers)
    print(f"feedback under a Postgres outage: {dict(statuses)} over {len(answers)} requests")
    assert set(statuses) <= {200, 201, 503}, statuses  # no 500, no dropped connection
    for answer in answers:
        if answer.status == 503:
            assert answer.json()["component"] == "database" and int(answer.retry_after) >= 1
    acknowledged = {a.tag for a in answers if a.status in (200, 201)}
    every = [event["event_id"] for event in events]
    assert acknowledged == set(every)  # every client got its events through in the end
    assert _rows_by_event(backend, every) == dict.fromkeys(every, 1)  # each stored once
    assert statuses[503] >= 8


def test_a_postgres_restart_costs_no_request(backend, monkeypatch):
    use_backend(monkeypatch, backend)
    with TestClient(create_app()) as api:
        for _ in range(4):  # the pool's connections are open and have been used
            assert api.post("/v1/feedback", json=new_event(backend)).status_code == 201
        assert _kill_connections(backend) >= 1
        # Each stale connection is found out by the pool's check, not by a request.
        statuses = [api.post("/v1/feedback", json=new_event(backend)).status_code for _ in range(6)]
        assert statuses == [201] * 6
        assert api.get("/v1/runs").status_code == 200


def test_a_connection_killed_after_the_pools_check_costs_no_request(backend, monkeypatch):
    # The session ends between the pool's check and the statement (a restart's signal lands
    # late): here, no check at all, so every pooled connection is handed out dead.
    async def no_check(cls, conn) -> None:
        return None

    monkeypatch.setattr(AsyncConnectionPool, "check_connection", classmethod(no_check))
    use_backend(monkeypatch, backend)
    with TestClient(create_app()) as api:
        events = [new_event(backend) for _ in range(10)]
        for event in events[:4]:
            assert api.post("/v1/feedback", json=event).status_code == 201
        assert _kill_connections(backend) >= 1
        statuses = [api.post("/v1/feedback", json=event).status_code for event in events[4:]]
        assert statuses == [201] * 6
    every = [event["event_id"] for event in events]
    assert _rows_by_event(backend, every) == dict.fromkeys(every, 1)


@pytest.mark.slow
def test_the_api_starts_without_postgres_and_stores_feedback_once_it_is_back(backend, monkeypatch):
    use_backend(monkeypatch, backend)
    outage = _Outage(backend)
    event = new_event(backend)
    outage.start()
    try:
        with TestClient(create_app()) as api:
            # Recommendations need only the online store.
            served = api.post("/v1/recommendations", json=ASKED)
            assert served.status_code == 200, served.text
            assert served.json()["run_id"] == backend.record.run_id
            started = time.perf_counter()
            ready = api.get("/readyz")
            print(f"/readyz with Postgres down: {time.perf_counter() - started:.3f} s")
            assert ready.status_code == 200, ready.text
            assert ready.json()["status"] == "degraded"
            assert ready.json()["checks"]["database"]["ok"] is False
            refused = api.post("/v1/feedback", json=event)
            assert refused.status_code == 503, refused.text
            assert refused.json()["component"] == "database"
            assert int(refused.headers["retry-after"]) >= 1

            outage.stop()
            # The same API process: its pool reconnects by itself.
            deadline = time.monotonic() + 60
            attempts = 0
            while True:
                attempts += 1
                response = api.post("/v1/feedback", json=event)
                if response.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            print(f"feedback stored after {attempts} attempts once Postgres was back")
            assert response.status_code == 201, response.text
            assert api.post("/v1/feedback", json=event).status_code == 200  # a retry
            assert api.get("/readyz").json()["status"] == "ready"
    finally:
        outage.stop()
    assert _rows_by_event(backend, [event["event_id"]]) == {event["event_id"]: 1}
