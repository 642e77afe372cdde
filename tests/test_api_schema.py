"""The OpenAPI schema tells the truth about the API: schemathesis (every check, every phase)
against the real server on both stacks, and the details a generator would not notice."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from encore.database import open_database
from encore.experiments import Experiment, new_experiment_id
from model_server.app import create_app
from tests.api_support import (
    BACKENDS,
    MAX_ID,
    TOP_N,
    Backend,
    published_backend,
    use_backend,
    validation_errors,
)
from tests.live import live_server

TOKEN = "schema-test-token"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
# Every check schemathesis has (not on the command line: --checks would override the
# operation's exception below). RunRequest refuses user_ids with kind "manual" and its schema
# does not say so (POST /v1/runs is being rewritten): every other check runs on it.
SCHEMATHESIS_CONFIG = """
[checks]
enabled = true
"""


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Backend]:
    with published_backend(request.param, tmp_path_factory.mktemp("schema") / "home") as b:
        # A running experiment, so that GET /v1/experiments/current answers (not only 404).
        with open_database(b.settings) as db:
            db.start_experiment(Experiment(new_experiment_id(), b.record.model_version, "v2", 0.1))
        yield b


@pytest.fixture
def api(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    use_backend(monkeypatch, backend)
    with TestClient(create_app()) as client:
        yield client


@pytest.mark.slow
def test_schemathesis_finds_nothing(backend, monkeypatch, tmp_path):
    use_backend(monkeypatch, backend, ENCORE_ADMIN_TOKEN=TOKEN)
    # Accepted POST /v1/runs only queue records (the API starts no process).
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    report = tmp_path / "report.json"
    with live_server(create_app()) as url:
        result = subprocess.run(
            [
                str(SCHEMATHESIS),
                "--config-file",
                str(config),
                "--no-color",
                "run",
                f"{url}/openapi.json",
                "--seed",
                "20261129",
                "--workers",
                "1",
                "--header",
                f"Authorization: Bearer {TOKEN}",
                "--generation-database",
                "none",
                "--report",
                "json",
                "--report-json-path",
                str(report),
            ],
            capture_output=True,
            text=True,
            timeout=540,
            cwd=tmp_path,  # its cache of examples, not in the work tree
        )
    output = result.stdout[-20_000:] + result.stderr[-5_000:]
    data = json.loads(report.read_text())
    print(f"schemathesis on {backend.kind}: {data['test_cases']}")
    assert data["failures"] == [], output
    assert data["errors"] == [], output
    assert {name: ops for name, ops in data["warnings"].items() if ops} == {}, output
    assert data["exit_code"] == 0 and result.returncode == 0, output
    assert data["complete"] and data["stop_reason"] == "completed", output
    # It tested something: every operation, in every phase that applies, many cases.
    assert data["operations"]["tested"] == data["operations"]["selected"] == 11, output
    assert data["test_cases"]["generated"] >= 500, data["test_cases"]


# --------------------------------------------------------------------------------------
# What a generator does not notice
# --------------------------------------------------------------------------------------


def _id_schemas(schema: dict) -> dict[str, dict]:
    components = schema["components"]["schemas"]
    feedback = components["LikeEvent"]["properties"]  # a view names no playlist
    (path_id,) = [
        p["schema"]
        for p in schema["paths"]["/v1/recommendations/{user_id}"]["get"]["parameters"]
        if p["name"] == "user_id"
    ]
    (names,) = schema["paths"]["/v1/playlists"]["get"]["parameters"]
    return {
        "user_ids": components["RecommendationsRequest"]["properties"]["user_ids"]["items"],
        "path user_id": path_id,
        "feedback user_id": feedback["user_id"],
        "liked_playlist_id": feedback["liked_playlist_id"],
        "shown_playlist_ids": feedback["shown_playlist_ids"]["items"],
        "playlist ids": names["schema"]["items"],
    }


def test_ids_are_published_as_int64_with_an_integer_maximum(api):
    raw = api.get("/openapi.json").text
    assert "e+18" not in raw and "9223372036854775807" in raw
    for where, schema in _id_schemas(json.loads(raw)).items():
        assert schema["type"] == "integer" and schema["format"] == "int64", where
        assert type(schema["maximum"]) is int and schema["maximum"] == MAX_ID, where
        assert type(schema["minimum"]) is int and schema["minimum"] == 0, where


def test_an_id_at_the_published_maximum_is_accepted(api, backend):
    top = {where: s["maximum"] for where, s in _id_schemas(api.get("/openapi.json").json()).items()}
    assert set(top.values()) == {MAX_ID}
    answered = api.post("/v1/recommendations", json={"user_ids": [top["user_ids"]]})
    assert answered.status_code == 200, answered.text
    assert answered.json()["recommendations"][0]["user_id"] == MAX_ID
    one = api.get(f"/v1/recommendations/{top['path user_id']}")
    assert one.status_code == 200 and one.json()["user_id"] == MAX_ID, one.text
    names = api.get(f"/v1/playlists?ids={top['playlist ids']}")
    assert names.json()["playlists"] == [{"playlist_id": MAX_ID, "name": None}], names.text
    event = {
        "event_id": str(uuid.uuid4()),
        "user_id": top["feedback user_id"],
        "run_id": backend.record.run_id,
        "liked_playlist_id": top["liked_playlist_id"],
        "shown_playlist_ids": [top["shown_playlist_ids"]],
    }
    stored = api.post("/v1/feedback", json=event)
    assert stored.status_code == 201, stored.text
    row = backend.feedback_rows()[event["event_id"]]
    assert (row["user_id"], row["liked_playlist_id"]) == (MAX_ID, MAX_ID)
    # One past it is refused, in the documented shape.
    past = api.post("/v1/recommendations", json={"user_ids": [MAX_ID + 1]})
    assert validation_errors(past)[0]["type"] == "less_than_equal"


def test_n_is_published_with_its_limits_and_they_hold(api, backend):
    schema = api.get("/openapi.json").json()
    body_n = schema["components"]["schemas"]["RecommendationsRequest"]["properties"]["n"]
    (query_n,) = [
        p["schema"]
        for p in schema["paths"]["/v1/recommendations/{user_id}"]["get"]["parameters"]
        if p["name"] == "n"
    ]
    for n in (body_n, query_n):
        (integer,) = [branch for branch in n["anyOf"] if branch["type"] == "integer"]
        assert (integer["minimum"], integer["maximum"]) == (1, TOP_N), n
    stored = backend.lists([14])[14]
    top = api.post("/v1/recommendations", json={"user_ids": [14], "n": TOP_N})
    assert top.json()["recommendations"][0]["playlist_ids"] == stored
    assert api.get(f"/v1/recommendations/14?n={TOP_N}").json()["playlist_ids"] == stored
    for refused in (
        api.post("/v1/recommendations", json={"user_ids": [14], "n": TOP_N + 1}),
        api.get(f"/v1/recommendations/14?n={TOP_N + 1}"),
        api.get("/v1/recommendations/14?n=0"),
    ):
        (error,) = validation_errors(refused)
        assert error["loc"][-1] == "n", error


def test_every_error_answer_is_documented_in_one_shape(api):
    schema = api.get("/openapi.json").json()
    assert set(schema["components"]["schemas"]) >= {"ErrorBody", "ValidationIssue"}
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    documented = {}
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            documented[f"{method.upper()} {path}"] = set(responses)
            for status, response in responses.items():
                if int(status) < 400 or (path, status) == ("/readyz", "503"):
                    continue
                body = response["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
                if status == "503":
                    assert response["headers"]["Retry-After"]["required"] is True, path
    assert documented == {
        "POST /v1/recommendations": {"200", "413", "422", "503"},
        "GET /v1/recommendations/{user_id}": {"200", "422", "503"},
        "POST /v1/feedback": {"200", "201", "409", "413", "422", "503"},
        "GET /v1/runs": {"200", "422", "503"},
        "POST /v1/runs": {"202", "401", "413", "422", "503"},
        "GET /v1/runs/{run_id}": {"200", "404", "422", "503"},
        "GET /v1/model": {"200", "503"},
        "GET /v1/experiments/current": {"200", "404", "503"},
        "GET /v1/playlists": {"200", "422", "503"},
        "GET /healthz": {"200"},
        "GET /readyz": {"200", "503"},
    }
    assert schema["paths"]["/v1/runs"]["post"]["security"] == [{"bearer": []}]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_a_body_that_is_not_json_text_is_422_like_bad_json(api):
    # json.loads fails with UnicodeDecodeError or RecursionError here, which FastAPI answers
    # with an undocumented 400; every other malformed body is FastAPI's 422 json_invalid.
    for raw in (b'{"user_ids": [1\xff]}', b"[" * 200_000):
        response = api.post(
            "/v1/recommendations", content=raw, headers={"content-type": "application/json"}
        )
        (error,) = validation_errors(response)
        assert error["loc"] == ["body"] and error["type"] == "json_invalid", error


def test_a_wrong_method_names_every_method_of_the_path(api):
    for method, path, allowed in (
        ("OPTIONS", "/v1/runs", "GET, HEAD, POST"),
        ("DELETE", "/v1/runs/some-run", "GET, HEAD"),
        ("GET", "/v1/feedback", "POST"),
    ):
        response = api.request(method, path)
        assert response.status_code == 405, (method, path, response.text)
        assert response.headers["allow"] == allowed, (method, path)
        assert response.json() == {"detail": "Method Not Allowed"}
