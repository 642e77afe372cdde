"""The API from no published run to runs it asks for, over both pairs of stores: 503s until a
run is published, then `POST /v1/runs` queueing runs and backfills that a real
`encore scheduler` process claims, publishes, and the API serves."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from encore.database import open_database
from encore.online import open_online_store
from encore.settings import get_settings
from model_server.app import create_app
from tests.api_support import BACKENDS, VERSION, error_detail
from tests.random_bundle import build_random_bundle
from tests.support import publish_random_run

TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
RUN_DEADLINE_SECONDS = 180  # a run process imports torch and starts 2 scoring processes


@pytest.fixture(params=BACKENDS)
def fresh(request: pytest.FixtureRequest, tmp_path, monkeypatch):
    """Empty stores, the admin token, and the random bundle built and promoted (not run).

    The settings are the environment's: the runs `POST /v1/runs` starts read them too.
    """
    if request.param == "redis+postgres":
        monkeypatch.setenv("ENCORE_REDIS_URL", request.getfixturevalue("redis_url"))
        monkeypatch.setenv("ENCORE_DATABASE_URL", request.getfixturevalue("database_url"))
    monkeypatch.setenv("ENCORE_WORKERS", "2")
    monkeypatch.setenv("ENCORE_ADMIN_TOKEN", TOKEN)
    # Every request sees the current run as it is now (the default caches it for a second).
    monkeypatch.setenv("ENCORE_RUN_CACHE_SECONDS", "0")
    get_settings.cache_clear()
    settings = get_settings()
    if settings.database_url:
        with open_database(settings) as db:
            db.upgrade()
    build_random_bundle(
        settings.bundles_dir,
        users=300,
        playlists=120,
        candidates=20,
        dim=16,
        cold_every=10,
        version=VERSION,
        names=True,
    )
    return settings


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def scheduler_process(fresh) -> Iterator[callable]:
    """Starts `encore scheduler` (the environment's settings) on demand; stopped at the end."""
    started: list[subprocess.Popen] = []
    log = fresh.home / "scheduler.log"

    def start() -> subprocess.Popen:
        env = {
            **os.environ,
            "ENCORE_QUEUE_POLL_SECONDS": "0.5",
            "ENCORE_SCHEDULER_METRICS_PORT": str(_free_port()),
        }
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "encore", "scheduler"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()


def _start(api: TestClient, body: dict) -> str:
    response = api.post("/v1/runs", json=body, headers=ADMIN)
    assert response.status_code == 202, response.text
    started = response.json()
    assert started["kind"] == body.get("kind", "manual") and started["status"] == "queued"
    assert response.headers["location"] == f"/v1/runs/{started['run_id']}"
    record = api.get(response.headers["location"])
    assert record.status_code == 200, record.text
    assert record.json()["status"] in ("queued", "running", "publishing", "published")
    return started["run_id"]


def _wait_until_finished(api: TestClient, settings, run_id: str) -> dict:
    deadline = time.monotonic() + RUN_DEADLINE_SECONDS
    while True:
        record = api.get(f"/v1/runs/{run_id}").json()
        if record["status"] in ("published", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    log = settings.home / "scheduler.log"
    assert record["status"] == "published", (record, log.read_text() if log.exists() else None)
    return record


def _served(api: TestClient, user_ids: list[int]) -> dict:
    response = api.post("/v1/recommendations", json={"user_ids": user_ids})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.slow
def test_from_no_run_to_runs_queued_through_the_api(fresh, scheduler_process):
    settings = fresh
    with TestClient(create_app()) as api:
        # Nothing published: alive, not ready, and every read is a JSON 503.
        assert api.get("/healthz").status_code == 200
        ready = api.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["status"] == "unavailable"
        assert any("no run" in problem for problem in ready.json()["problems"])
        for method, url, body in (
            ("POST", "/v1/recommendations", {"user_ids": [14]}),
            ("GET", "/v1/recommendations/14", None),
            ("GET", "/v1/model", None),
            ("GET", "/v1/playlists?ids=1", None),
        ):
            response = api.request(method, url, json=body)
            assert response.status_code == 503, (url, response.text)
            assert "no run has been published" in error_detail(response)
        assert api.get("/v1/runs").json() == {"runs": []}

        # A run published (by another process, as the scheduler would): ready, and served.
        first = publish_random_run(settings)
        ready = api.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert (ready.json()["status"], ready.json()["run_id"]) == ("ready", first.run_id)
        assert _served(api, [14])["run_id"] == first.run_id

        # POST /v1/runs queues a run and answers at once; the API starts no process.
        queued_id = _start(api, {"kind": "manual"})
        assert api.get(f"/v1/runs/{queued_id}").json()["status"] == "queued"
        # The scheduler, started later, claims it.
        scheduler = scheduler_process()
        second_id = queued_id
        assert second_id != first.run_id
        second = _wait_until_finished(api, settings, second_id)
        assert second["kind"] == "manual" and second["model_version"] == VERSION
        assert second["users_total"] == 300 and second["cold_users"] == 30
        assert second["target_run_id"] is None
        # The server now serves the new run.
        served = _served(api, [14, 7])
        assert served["run_id"] == second_id and served["model_version"] == VERSION
        assert [item["source"] for item in served["recommendations"]] == ["batch", "fallback"]
        assert api.get("/readyz").json()["run_id"] == second_id
        assert api.get("/v1/model").json()["run_id"] == second_id
        runs = api.get("/v1/runs").json()["runs"]
        assert [run["run_id"] for run in runs] == [second_id, first.run_id]  # newest first

        # A backfill rescoring some users into the served run: take user 14's list out of
        # it first, so that it is the backfill that puts it back.
        with open_online_store(settings) as store:
            (kept,) = store.read(second_id, [14])
            store.delete_users(second_id, [14])
        assert _served(api, [14])["recommendations"][0]["source"] == "fallback"
        backfill_id = _start(api, {"kind": "backfill", "user_ids": [14, 7, 123_456_789]})
        backfill = _wait_until_finished(api, settings, backfill_id)
        assert backfill["kind"] == "backfill" and backfill["target_run_id"] == second_id
        # 14 and 7 are the model's (7 has no candidates), 123456789 is not.
        assert backfill["users_total"] == 2 and backfill["users_scored"] == 2
        assert backfill["cold_users"] == 1
        served = _served(api, [14, 7, 21])
        assert served["run_id"] == second_id  # a backfill does not flip the served run
        assert served["recommendations"][0] == {
            "user_id": 14,
            "playlist_ids": json.loads(kept)[:10],
            "source": "batch",
            "model_version": served["model_version"],
        }
        assert served["recommendations"][1]["source"] == "fallback"
        assert served["recommendations"][2]["source"] == "batch"

        runs = {run["run_id"]: run for run in api.get("/v1/runs").json()["runs"]}
        assert runs[first.run_id]["status"] == "superseded"
        assert runs[second_id]["status"] == "published"
        assert scheduler.poll() is None  # still serving its schedule


def test_an_empty_backfill_is_refused_and_queues_nothing(fresh):
    with TestClient(create_app()) as api:
        response = api.post("/v1/runs", json={"kind": "backfill", "user_ids": []}, headers=ADMIN)
        assert response.status_code == 422, response.text
        assert "user_ids" in json.dumps(error_detail(response))
        assert api.get("/v1/runs").json() == {"runs": []}
