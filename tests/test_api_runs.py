"""The API from no published run to runs it starts itself, over both pairs of stores: 503s
until a run is published, then `POST /v1/runs` launching real `encore run` / `encore backfill`
processes whose runs are published and served."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from encore.database import open_database
from encore.online import open_online_store
from encore.settings import get_settings
from model_server.app import create_app
from tests.support import publish_random_run
from tests.test_api import BACKENDS, VERSION, error_detail
from training.random_bundle import build_random_bundle

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


@pytest.fixture
def launched() -> Iterator[list[subprocess.Popen]]:
    """Run processes started by the API in a test; any still running at its end are stopped."""
    children: list[subprocess.Popen] = []
    yield children
    for child in children:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)  # its own session: it and its pool
        child.wait(timeout=60)


def _start(api: TestClient, launched: list, body: dict) -> str:
    response = api.post("/v1/runs", json=body, headers=ADMIN)
    assert response.status_code == 202, response.text
    launched.append(api.app.state.serving.children[-1])
    started = response.json()
    assert started["kind"] == body.get("kind", "manual") and started["status"] == "queued"
    assert response.headers["location"] == f"/v1/runs/{started['run_id']}"
    record = api.get(response.headers["location"])
    assert record.status_code == 200, record.text
    assert record.json()["status"] in ("queued", "running", "published")
    return started["run_id"]


def _wait_until_finished(api: TestClient, settings, run_id: str) -> dict:
    deadline = time.monotonic() + RUN_DEADLINE_SECONDS
    while True:
        record = api.get(f"/v1/runs/{run_id}").json()
        if record["status"] in ("published", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    log = settings.home / "logs" / f"run-{run_id}.log"
    assert record["status"] == "published", (record, log.read_text() if log.exists() else None)
    return record


def _served(api: TestClient, user_ids: list[int]) -> dict:
    response = api.post("/v1/recommendations", json={"user_ids": user_ids})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.slow
def test_from_no_run_to_runs_started_through_the_api(fresh, launched):
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

        # POST /v1/runs starts `encore run` in its own process and answers at once.
        second_id = _start(api, launched, {"kind": "manual"})
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
        backfill_id = _start(api, launched, {"kind": "backfill", "user_ids": [14, 7, 123_456_789]})
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
        }
        assert served["recommendations"][1]["source"] == "fallback"
        assert served["recommendations"][2]["source"] == "batch"

        for child in launched:
            assert child.wait(timeout=60) == 0
