"""The HTTP API around its read routes, on a published run over both pairs of stores (real Redis +
real Postgres, and the embedded SQLite defaults): the run records (GET /v1/runs) and POST
/v1/runs refused without the right admin token, CORS, the request-body limit (413, also for a
chunked body), /metrics, and a server process that never imports torch, training or the
scheduler. The published run and the app come from tests/api_support.py."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from model_server.app import create_app
from tests.api_support import VERSION, Backend, error_detail, served_counts, use_backend
from tests.api_support import api as api  # fixtures, imported by name
from tests.api_support import backend as backend

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
# GET /v1/runs
# --------------------------------------------------------------------------------------


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
