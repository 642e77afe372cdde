"""The HTTP API (README, "The HTTP API"), on a published run, over both pairs of stores:
real Redis + real Postgres, and the embedded SQLite defaults.

Publishing a run starts a scoring pool, so each module publishes once per backend
(module-scoped, with settings built explicitly) and every test opens its own app on it
through ``TestClient`` used as a context manager, so the lifespan runs. The helpers here
are shared with the other ``test_api_*`` modules.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

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
BATCH_USERS = [14, 21, 70]  # codes 1, 2, 9 (publish_random_run: ids 7 * (code + 1))
COLD_USERS = [7, 77]  # codes 0 and 10: every 10th user has no candidates
UNKNOWN_USERS = [0, 5, 123_456_789, MAX_ID]


# --------------------------------------------------------------------------------------
# Backends shared by the test_api_* modules
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
# This module's fixtures
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


# --------------------------------------------------------------------------------------
# POST /v1/recommendations
# --------------------------------------------------------------------------------------


def test_lists_in_the_order_asked_with_duplicates_and_fallbacks(api, backend):
    asked = [14, 7, 0, 21, 14, MAX_ID, 70, 5, 77, 21]
    stored = backend.lists(sorted(set(asked + UNKNOWN_USERS)))
    assert all(stored[u] for u in BATCH_USERS), "the published run must hold lists for them"
    assert all(stored[u] is None for u in COLD_USERS + UNKNOWN_USERS)
    batch_before, fallback_before = served_counts()

    response = api.post("/v1/recommendations", json={"user_ids": asked})

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"run_id", "model_version", "recommendations"}
    assert body["run_id"] == backend.record.run_id
    assert body["model_version"] == VERSION
    items = body["recommendations"]
    assert [item["user_id"] for item in items] == asked  # order kept, duplicates kept
    for item in items:
        assert set(item) == {"user_id", "playlist_ids", "source"}
        user = item["user_id"]
        if user in BATCH_USERS:
            assert item == {"user_id": user, "playlist_ids": stored[user][:10], "source": "batch"}
        else:  # cold (no candidates) or unknown to the run: its fallback, never an error
            assert item == {
                "user_id": user,
                "playlist_ids": backend.fallback[:10],
                "source": "fallback",
            }
    assert items[0] == items[4]  # the same user twice gets the same list twice
    assert len(backend.fallback) == TOP_N
    assert len(stored[14]) == TOP_N
    # 5 lists from the run, 5 fallbacks (7, 0, MAX_ID, 5, 77).
    batch_after, fallback_after = served_counts()
    assert (batch_after - batch_before, fallback_after - fallback_before) == (5, 5)


def test_n_defaults_to_10_and_may_be_the_stored_top_n(api, backend):
    stored = backend.lists([14])[14]
    for n, expected in ((None, 10), (1, 1), (TOP_N, TOP_N)):
        body = {"user_ids": [14, 7]} | ({} if n is None else {"n": n})
        response = api.post("/v1/recommendations", json=body)
        assert response.status_code == 200, response.text
        batch, fallback = response.json()["recommendations"]
        assert batch["playlist_ids"] == stored[:expected]
        assert fallback["playlist_ids"] == backend.fallback[:expected]


@pytest.mark.parametrize("n", [TOP_N + 1, 1000, MAX_ID])
def test_n_over_the_stored_top_n_is_422_naming_the_maximum(api, n):
    before = served_counts()
    response = api.post("/v1/recommendations", json={"user_ids": [14], "n": n})
    # The shape of every 422, pydantic's or the API's own check: where, what, why.
    (error,) = validation_errors(response)
    assert error["loc"] == ["body", "n"] and error["type"] == "less_than_equal", error
    assert f"between 1 and {TOP_N}" in error["msg"] and str(n) in error["msg"]
    assert error["input"] == n and error["ctx"] == {"le": TOP_N}
    assert served_counts() == before


def test_exactly_1000_users_are_answered(api, backend):
    asked = [7 * (code + 1) for code in range(1000)]  # 300 known users, then unknown ones
    response = api.post("/v1/recommendations", json={"user_ids": asked})
    assert response.status_code == 200, response.text
    items = response.json()["recommendations"]
    assert [item["user_id"] for item in items] == asked
    sources = [item["source"] for item in items]
    assert sources.count("batch") == backend.record.users_total - backend.record.cold_users


# Each: the body, then the error's location and type (pydantic's names) the 422 must report.
BAD_RECOMMENDATION_BODIES = {
    "string id": ({"user_ids": [14, "12"]}, ["body", "user_ids", 1], "int_type"),
    "float id": ({"user_ids": [1.5]}, ["body", "user_ids", 0], "int_type"),
    # 14.0 is the integer 14 (JSON Schema's integer); past 2^53 a float is not exact.
    "float id past 2^53": ({"user_ids": [2.0**53 + 2]}, ["body", "user_ids", 0], "int_type"),
    "float n": ({"user_ids": [14], "n": 2.5}, ["body", "n"], "int_type"),
    "boolean id": ({"user_ids": [True]}, ["body", "user_ids", 0], "int_type"),
    "null id": ({"user_ids": [None]}, ["body", "user_ids", 0], "int_type"),
    "negative id": ({"user_ids": [14, -1]}, ["body", "user_ids", 1], "greater_than_equal"),
    "id over 2^63-1": ({"user_ids": [2**63]}, ["body", "user_ids", 0], "less_than_equal"),
    "id over 2^64": ({"user_ids": [2**64 + 1]}, ["body", "user_ids", 0], "less_than_equal"),
    "1001 ids": ({"user_ids": list(range(1001))}, ["body", "user_ids"], "too_long"),
    "empty list": ({"user_ids": []}, ["body", "user_ids"], "too_short"),
    "ids not a list": ({"user_ids": 14}, ["body", "user_ids"], "list_type"),
    "no ids": ({"n": 3}, ["body", "user_ids"], "missing"),
    "n = 0": ({"user_ids": [14], "n": 0}, ["body", "n"], "greater_than_equal"),
    "negative n": ({"user_ids": [14], "n": -5}, ["body", "n"], "greater_than_equal"),
    "string n": ({"user_ids": [14], "n": "5"}, ["body", "n"], "int_type"),
    "unknown field": ({"user_ids": [14], "count": 5}, ["body", "count"], "extra_forbidden"),
    "not an object": ([14, 21], ["body"], "model_attributes_type"),
}


@pytest.mark.parametrize(
    ("body", "loc", "kind"),
    list(BAD_RECOMMENDATION_BODIES.values()),
    ids=list(BAD_RECOMMENDATION_BODIES),
)
def test_bad_recommendation_requests_are_422_saying_what_was_wrong(api, body, loc, kind):
    before = served_counts()
    response = api.post("/v1/recommendations", json=body)
    errors = validation_errors(response)
    assert any(e["loc"] == loc and e["type"] == kind for e in errors), errors
    assert served_counts() == before  # nothing was answered, nothing counted


@pytest.mark.parametrize(
    "raw", [b'{"user_ids": [14,', b"user_ids=14", b'{"user_ids": [14]} trailing', b"\xff\xfe"]
)
def test_malformed_json_is_422(api, raw):
    before = served_counts()
    response = api.post(
        "/v1/recommendations", content=raw, headers={"content-type": "application/json"}
    )
    errors = validation_errors(response)
    assert errors[0]["type"] == "json_invalid", errors
    assert served_counts() == before


# --------------------------------------------------------------------------------------
# GET /v1/recommendations/{user_id}
# --------------------------------------------------------------------------------------


def test_one_users_list(api, backend):
    stored = backend.lists([21])[21]
    head = {"run_id": backend.record.run_id, "model_version": VERSION}
    cases = [
        ("/v1/recommendations/21", {"user_id": 21, "playlist_ids": stored[:10], "source": "batch"}),
        (
            f"/v1/recommendations/21?n={TOP_N}",
            {"user_id": 21, "playlist_ids": stored, "source": "batch"},
        ),
        (
            "/v1/recommendations/77?n=3",
            {"user_id": 77, "playlist_ids": backend.fallback[:3], "source": "fallback"},
        ),
        (
            f"/v1/recommendations/{MAX_ID}",
            {"user_id": MAX_ID, "playlist_ids": backend.fallback[:10], "source": "fallback"},
        ),
    ]
    for url, expected in cases:
        response = api.get(url)
        assert response.status_code == 200, (url, response.text)
        assert response.headers["content-type"] == "application/json"
        assert response.json() == head | expected, url
    # The same element as the batch route gives.
    batch = api.post("/v1/recommendations", json={"user_ids": [21]}).json()
    assert api.get("/v1/recommendations/21").json() == head | batch["recommendations"][0]


PATH_ERROR = '["path", "user_id"]'


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("abc", PATH_ERROR),
        ("1.5", PATH_ERROR),
        ("true", PATH_ERROR),
        ("-1", PATH_ERROR),
        (str(2**63), PATH_ERROR),
        ("14?n=0", '["query", "n"]'),
        ("14?n=-1", '["query", "n"]'),
        ("14?n=ten", '["query", "n"]'),
    ],
)
def test_bad_path_or_n_for_one_user_is_422(api, path, said):
    before = served_counts()
    response = api.get(f"/v1/recommendations/{path}")
    assert said in json.dumps(validation_errors(response))
    assert served_counts() == before


def test_n_over_top_n_for_one_user_is_422_naming_the_maximum(api):
    response = api.get(f"/v1/recommendations/14?n={TOP_N + 1}")
    (error,) = validation_errors(response)
    assert error["loc"] == ["query", "n"] and error["type"] == "less_than_equal", error
    assert f"between 1 and {TOP_N}" in error["msg"]


def test_integral_floats_are_integers(api, backend):
    # JSON Schema (OpenAPI 3.1) counts 14.0 as the integer 14, so the API takes it as such.
    stored = backend.lists([14])[14]
    response = api.post("/v1/recommendations", json={"user_ids": [14.0, 7, 1e3], "n": 3.0})
    assert response.status_code == 200, response.text
    items = response.json()["recommendations"]
    assert [item["user_id"] for item in items] == [14, 7, 1000]
    assert items[0]["playlist_ids"] == stored[:3]
    assert response.text.count('"user_id":14,') == 1  # written as an integer, not 14.0


# --------------------------------------------------------------------------------------
# Body size limit
# --------------------------------------------------------------------------------------


def _padded_body(size: int) -> bytes:
    """A valid recommendations body of exactly ``size`` bytes (spaces are valid JSON)."""
    body = b'{"user_ids": [14, 21]}'
    return body[:-1] + b" " * (size - len(body)) + b"}"


def test_bodies_over_the_limit_are_413_also_when_chunked(backend, monkeypatch):
    use_backend(monkeypatch, backend, ENCORE_MAX_BODY_BYTES="2048")
    with TestClient(create_app()) as api:
        before = served_counts()
        rows = len(backend.feedback_rows())
        json_type = {"content-type": "application/json"}

        # At the limit: answered.
        ok = api.post("/v1/recommendations", content=_padded_body(2048), headers=json_type)
        assert ok.status_code == 200, ok.text

        # Over it, with a content-length: refused before the body is read.
        big = _padded_body(2049)
        response = api.post("/v1/recommendations", content=big, headers=json_type)
        assert response.status_code == 413, response.text
        assert "2048" in error_detail(response) and "ENCORE_MAX_BODY_BYTES" in response.text

        # Over it, chunked (no content-length): refused while it is read.
        def chunks(data: bytes) -> Iterator[bytes]:
            for start in range(0, len(data), 500):
                yield data[start : start + 500]

        for path in ("/v1/recommendations", "/v1/feedback"):
            request = api.build_request("POST", path, content=chunks(big), headers=json_type)
            assert "content-length" not in request.headers
            assert request.headers["transfer-encoding"] == "chunked"
            response = api.send(request)
            assert response.status_code == 413, (path, response.text)
            assert "ENCORE_MAX_BODY_BYTES" in error_detail(response)

        # A chunked body within the limit is still read whole.
        small = api.send(
            api.build_request(
                "POST",
                "/v1/recommendations",
                content=chunks(_padded_body(1500)),
                headers=json_type,
            )
        )
        assert small.status_code == 200, small.text
        assert [i["user_id"] for i in small.json()["recommendations"]] == [14, 21]

        # A feedback event too big to be taken is not stored.
        event = {
            "event_id": str(uuid.uuid4()),
            "user_id": 14,
            "run_id": backend.record.run_id,
            "liked_playlist_id": 1,
            "shown_playlist_ids": list(range(1000)),
        }
        response = api.post("/v1/feedback", json=event)
        assert response.status_code == 413, response.text
        assert len(backend.feedback_rows()) == rows

        # Two answered requests of two users each; nothing counted for the refused ones.
        after = served_counts()
        assert after[0] - before[0] == 4 and after[1] == before[1]


# --------------------------------------------------------------------------------------
# Model, playlists, runs, health
# --------------------------------------------------------------------------------------


def test_healthz_and_readyz(api, backend):
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready" and body["run_id"] == backend.record.run_id
    assert body["problems"] == []
    assert set(body["checks"]) == {"online_store", "database"}
    for name, check in body["checks"].items():
        assert check["ok"] is True and check["detail"] is None, name
        assert 0 <= check["seconds"] < 1, name


def test_model(api, backend):
    response = api.get("/v1/model")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == VERSION
    assert body["run_id"] == backend.record.run_id
    assert body["top_n"] == TOP_N
    assert body["published_at"] == pytest.approx(backend.run.published_at)
    assert body["metadata"]["version"] == VERSION
    assert body["metadata"]["data"] == {"users": 300, "playlists": 120}


def test_playlist_names(api, backend):
    response = api.get("/v1/playlists", params={"ids": "2,1,500,2"})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "run_id": backend.record.run_id,
        "playlists": [
            {"playlist_id": 2, "name": "Playlist 2"},
            {"playlist_id": 1, "name": "Playlist 1"},
            {"playlist_id": 500, "name": None},  # not in the catalog
            {"playlist_id": 2, "name": "Playlist 2"},
        ],
    }


@pytest.mark.parametrize(
    "query",
    [
        "ids=1,x",
        "ids=1.5",
        "ids=",
        "ids=-1",
        f"ids={2**63}",
        "ids=" + ",".join(["1"] * 201),
        "",
        "ids=1,,2",
        "ids=+1",
        "ids=1_0",
        "ids=%201",
        "ids=" + "9" * 5000,
    ],
)
def test_bad_playlist_ids_are_422(api, query):
    response = api.get(f"/v1/playlists?{query}")
    errors = validation_errors(response)
    assert all(error["loc"][:2] == ["query", "ids"] for error in errors), errors


def test_runs(api, backend):
    record = backend.record
    response = api.get("/v1/runs")
    assert response.status_code == 200, response.text
    runs = response.json()["runs"]
    assert [run["run_id"] for run in runs] == [record.run_id]
    one = api.get(f"/v1/runs/{record.run_id}")
    assert one.status_code == 200, one.text
    body = one.json()
    assert body == runs[0]
    assert body["kind"] == "manual" and body["status"] == "published"
    assert body["model_version"] == VERSION
    assert body["users_total"] == 300 and body["users_scored"] == 300
    assert body["cold_users"] == 30 and body["cold_fraction"] == pytest.approx(0.1)
    assert body["progress"] == 1.0 and body["error"] is None
    assert body["target_run_id"] is None
    for name in ("created_at", "started_at", "finished_at"):
        assert datetime.fromisoformat(body[name]).tzinfo is not None, name
    assert api.get("/v1/runs", params={"limit": 0}).status_code == 422


@pytest.mark.parametrize("run_id", ["20990101T000000Z-ffffff", "nope", "%20"])
def test_unknown_run_is_404(api, run_id):
    response = api.get(f"/v1/runs/{run_id}")
    assert response.status_code == 404, response.text
    assert "no run" in error_detail(response)


# --------------------------------------------------------------------------------------
# POST /v1/runs: refused requests (the accepted ones are in test_api_runs.py)
# --------------------------------------------------------------------------------------


def _refused_run_requests(
    api: TestClient, backend: Backend, headers: list[dict[str, str]], status: int
) -> None:
    for header in headers:
        for body in ({}, {"kind": "manual"}, {"kind": "backfill", "user_ids": [14]}):
            response = api.post("/v1/runs", json=body, headers=header)
            assert response.status_code == status, (header, body, response.text)
            error_detail(response)
            if status == 401:
                assert response.headers["www-authenticate"] == "Bearer"
    assert [r["run_id"] for r in api.get("/v1/runs").json()["runs"]] == [backend.record.run_id]


ANY_TOKENS = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer s3cret"},
    {"Authorization": "Basic czNjcmV0"},
]


@pytest.mark.parametrize("token", [None, "", "   "], ids=["unset", "empty", "blank"])
def test_runs_cannot_be_started_without_an_admin_token(backend, monkeypatch, token):
    monkeypatch.delenv("ENCORE_ADMIN_TOKEN", raising=False)
    env = {} if token is None else {"ENCORE_ADMIN_TOKEN": token}
    use_backend(monkeypatch, backend, **env)
    with TestClient(create_app()) as api:
        _refused_run_requests(api, backend, ANY_TOKENS, 401)
        response = api.post("/v1/runs", json={})
        assert "ENCORE_ADMIN_TOKEN" in error_detail(response)


def test_runs_need_the_right_bearer_token(backend, monkeypatch):
    use_backend(monkeypatch, backend, ENCORE_ADMIN_TOKEN="s3cret")
    wrong = [
        *[h for h in ANY_TOKENS if h != {"Authorization": "Bearer s3cret"}],
        {"Authorization": "Bearer s3cret2"},
        {"Authorization": "Bearer S3CRET"},
        {"Authorization": "s3cret"},
        {"Authorization": "Bearer  s3cret"},
    ]
    with TestClient(create_app()) as api:
        _refused_run_requests(api, backend, wrong, 401)
        # The right token with a body that is wrong: 422, and still nothing queued.
        for body in (
            {"kind": "manual", "user_ids": [14]},
            {"kind": "backfill", "user_ids": []},
            {"kind": "nightly"},
            {"kind": "backfill", "user_ids": ["14"]},
            {"kind": "backfill", "user_ids": [-1]},
            {"kind": "manual", "extra": 1},
        ):
            response = api.post("/v1/runs", json=body, headers={"Authorization": "Bearer s3cret"})
            assert response.status_code == 422, (body, response.text)
            error_detail(response)
        assert len(api.get("/v1/runs").json()["runs"]) == 1


# --------------------------------------------------------------------------------------
# CORS
# --------------------------------------------------------------------------------------

PAGE = "https://page.example"
PREFLIGHT = {
    "Origin": PAGE,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type",
}


def test_cors_is_closed_by_default(backend, monkeypatch):
    monkeypatch.delenv("ENCORE_CORS_ORIGINS", raising=False)
    use_backend(monkeypatch, backend)
    with TestClient(create_app()) as api:
        simple = api.post("/v1/recommendations", json={"user_ids": [14]}, headers={"Origin": PAGE})
        assert simple.status_code == 200
        assert "access-control-allow-origin" not in simple.headers
        preflight = api.options("/v1/feedback", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in preflight.headers
        assert preflight.status_code >= 400


def test_cors_is_open_for_a_configured_origin(backend, monkeypatch):
    use_backend(monkeypatch, backend, ENCORE_CORS_ORIGINS=f"{PAGE}, https://other.example")
    with TestClient(create_app()) as api:
        simple = api.post("/v1/recommendations", json={"user_ids": [14]}, headers={"Origin": PAGE})
        assert simple.status_code == 200
        assert simple.headers["access-control-allow-origin"] == PAGE
        preflight = api.options("/v1/feedback", headers=PREFLIGHT)
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == PAGE
        assert "POST" in preflight.headers["access-control-allow-methods"]
        # Another origin is still refused.
        stranger = {"Origin": "https://evil.example"}
        other = api.post("/v1/recommendations", json={"user_ids": [14]}, headers=stranger)
        assert "access-control-allow-origin" not in other.headers
        refused = api.options("/v1/feedback", headers=PREFLIGHT | stranger)
        assert "access-control-allow-origin" not in refused.headers
        assert refused.status_code == 400


# --------------------------------------------------------------------------------------
# /metrics (the only test that imports model_server.main: it instruments at import)
# --------------------------------------------------------------------------------------


def test_metrics(backend, monkeypatch):
    use_backend(monkeypatch, backend)
    from model_server import main

    with TestClient(main.app) as api:
        before = served_counts()
        assert api.post("/v1/recommendations", json={"user_ids": [14, 7, 5]}).status_code == 200
        assert api.get("/v1/recommendations/21").status_code == 200
        event = {
            "event_id": str(uuid.uuid4()),
            "user_id": 14,
            "run_id": backend.record.run_id,
            "liked_playlist_id": 3,
            "shown_playlist_ids": [1, 2, 3],
        }
        assert api.post("/v1/feedback", json=event).status_code == 201
        assert api.post("/v1/feedback", json=event).status_code == 200
        response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    # prometheus-fastapi-instrumentator's, by route template.
    assert (
        value("http_requests_total", handler="/v1/recommendations", method="POST", status="2xx")
        >= 1
    )
    assert (
        value(
            "http_requests_total",
            handler="/v1/recommendations/{user_id}",
            method="GET",
            status="2xx",
        )
        >= 1
    )
    assert value("http_request_duration_seconds_count", handler="/v1/feedback", method="POST") >= 2
    assert not any(labels and dict(labels).get("handler") == "/metrics" for _, labels in samples)
    # Encore's own: users served by source (as this process counted them), store reads,
    # feedback outcomes, the run being served.
    assert value("encore_users_served_total", source="batch") == before[0] + 2
    assert value("encore_users_served_total", source="fallback") == before[1] + 2
    assert value("encore_cold_users_total") >= 2
    reads = value("encore_store_read_seconds_count", operation="recommendations")
    assert reads >= 2
    assert (
        value("encore_store_read_seconds_bucket", operation="recommendations", le="+Inf") == reads
    )
    assert (
        value("encore_store_read_seconds_bucket", operation="recommendations", le="0.0001") <= reads
    )
    for outcome in ("stored", "duplicate", "failed"):
        assert ("encore_feedback_events_total", (("outcome", outcome),)) in samples
    assert value("encore_feedback_events_total", outcome="stored") >= 1
    assert value("encore_feedback_events_total", outcome="duplicate") >= 1
    assert value("encore_feedback_likes_total", model_version=VERSION) >= 1
    assert (
        value("encore_serving_run_info", run_id=backend.record.run_id, model_version=VERSION) == 1
    )
    assert value("encore_current_run_age_seconds") >= 0


# --------------------------------------------------------------------------------------
# The server's imports
# --------------------------------------------------------------------------------------

IMPORT_CHECK = """
import sys
import model_server.main
from fastapi.testclient import TestClient

with TestClient(model_server.main.app) as client:
    assert client.get("/healthz").status_code == 200
    assert client.post("/v1/recommendations", json={"user_ids": [1]}).status_code == 503
    assert client.get("/metrics").status_code == 200
heavy = sorted(
    name for name in sys.modules
    if name.split(".")[0] in {"torch", "training", "scheduler", "apscheduler"}
)
assert not heavy, heavy
"""


def test_the_server_never_imports_torch_training_or_the_scheduler():
    # A fresh interpreter: this one has imported them already to publish runs.
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK],
        env=dict(os.environ),  # ENCORE_HOME: this test's own, empty
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------
# Errors outside the routes, and a store that is down
# --------------------------------------------------------------------------------------


def test_unknown_routes_and_methods_answer_json(api):
    missing = api.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert error_detail(missing)
    wrong = api.get("/v1/feedback")
    assert wrong.status_code == 405
    assert error_detail(wrong)


def test_an_unreachable_online_store_is_503(monkeypatch):
    # Nothing listens on port 1: the online store is down from the start.
    monkeypatch.setenv("ENCORE_REDIS_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    with TestClient(create_app()) as api:
        assert api.get("/healthz").status_code == 200
        ready = api.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["status"] == "unavailable"
        assert ready.json()["checks"]["online_store"]["ok"] is False
        assert ready.json()["checks"]["database"]["ok"] is True  # the embedded SQLite
        assert any("online store" in problem for problem in ready.json()["problems"])
        for response in (
            api.post("/v1/recommendations", json={"user_ids": [14]}),
            api.get("/v1/recommendations/14"),
            api.get("/v1/model"),
            api.get("/v1/playlists?ids=1"),
        ):
            assert response.status_code == 503, response.text
            assert response.json()["component"] == "online_store"
            assert "online store is unavailable" in error_detail(response)
            assert "redis://" not in response.text  # no URL, no driver error text
            assert int(response.headers["retry-after"]) >= 1


def test_feedback_is_stored_while_the_online_store_is_down(monkeypatch):
    # The served run is only a shortcut to the event's model version; the run records have it.
    monkeypatch.setenv("ENCORE_REDIS_URL", "redis://127.0.0.1:1/0")
    get_settings.cache_clear()
    settings = get_settings()
    with open_database(settings) as db:
        db.upgrade()
        db.create_run(RunRecord("run-1", "manual", "published", model_version=VERSION))
    event = {
        "event_id": str(uuid.uuid4()),
        "user_id": 14,
        "run_id": "run-1",
        "liked_playlist_id": 3,
        "shown_playlist_ids": [3],
    }
    with TestClient(create_app()) as api:
        response = api.post("/v1/feedback", json=event)
        assert response.status_code == 201, response.text
        assert response.json()["model_version"] == VERSION
    rows = Backend("sqlite", settings).feedback_rows()
    assert rows[event["event_id"]]["model_version"] == VERSION


def test_an_embedded_online_store_that_is_not_a_database_is_503(monkeypatch):
    # sqlite3.DatabaseError ("file is not a database"), not only OperationalError, is a 503.
    home = get_settings().home
    home.mkdir(parents=True)
    get_settings().sqlite_online_path.write_bytes(b"not a database, " * 1024)
    with TestClient(create_app()) as api:
        for response in (
            api.post("/v1/recommendations", json={"user_ids": [14]}),
            api.get("/v1/recommendations/14"),
            api.get("/readyz"),
        ):
            assert response.status_code == 503, response.text
            assert "not a database" not in response.text  # the cause is for the log
        assert api.get("/v1/model").json()["component"] == "online_store"
