"""The HTTP API's read routes (README, "The HTTP API") on a published run, over both pairs of
stores (real Redis + real Postgres, and the embedded SQLite defaults): the recommendations of
many users (POST) and of one (GET) with every 422 they owe, /healthz and /readyz, the model and
the playlist names, unknown routes, and JSON 503s while the online store is down (feedback is
still stored then). The published run and the app come from tests/api_support.py."""

from __future__ import annotations

import json
import uuid

import pytest
from fastapi.testclient import TestClient

from encore.database import RunRecord, open_database
from encore.settings import get_settings
from model_server.app import create_app
from tests.api_support import (
    MAX_ID,
    TOP_N,
    VERSION,
    Backend,
    error_detail,
    served_counts,
    validation_errors,
)
from tests.api_support import api as api  # fixtures, imported by name
from tests.api_support import backend as backend

BATCH_USERS = [14, 21, 70]  # codes 1, 2, 9 (publish_random_run: ids 7 * (code + 1))
COLD_USERS = [7, 77]  # codes 0 and 10: every 10th user has no candidates
UNKNOWN_USERS = [0, 5, 123_456_789, MAX_ID]


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
        assert set(item) == {"user_id", "playlist_ids", "source", "model_version"}
        user = item["user_id"]
        if user in BATCH_USERS:
            assert item == {
                "user_id": user,
                "playlist_ids": stored[user][:10],
                "source": "batch",
                "model_version": VERSION,  # no experiment: the champion chose every list
            }
        else:  # cold (no candidates) or unknown to the run: its fallback, never an error
            assert item == {
                "user_id": user,
                "playlist_ids": backend.fallback[:10],
                "source": "fallback",
                "model_version": VERSION,
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
        assert response.text.count('"model_version"') == 1, response.text  # one key, not two
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
# Health, model, playlists
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
