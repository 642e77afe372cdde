"""A run with a challenger, end to end on the embedded SQLite and on real Redis and Postgres:
each user's list comes from the version of its arm, the API labels every element with that
version, views and likes are attributed to it, and the report and the CLI agree."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from encore.bundle import open_bundle, promote
from encore.cli import app as cli
from encore.database import open_database
from encore.experiments import Challenger, Experiment, challenger_mask, new_experiment_id
from encore.settings import Settings, get_settings
from inference import load_model
from model_server.app import create_app
from scheduler.job import run_backfill, run_full
from tests.lifecycle import USERS, _second_bundle, settings  # noqa: F401 (a fixture)
from tests.random_bundle import build_random_bundle

SHARE = 0.4


def _bundles(config: Settings) -> None:
    options = {"users": USERS, "playlists": 120, "candidates": 20, "dim": 16, "cold_every": 10}
    build_random_bundle(config.bundles_dir, version="random-v1", seed=0, **options)
    _second_bundle(config)  # random-v2: the same users, other weights, other lists
    promote(config.bundles_dir, "random-v1")


def _expected(config: Settings, version: str) -> dict[int, bytes]:
    scored = load_model(open_bundle(config.bundles_dir, version), top_n=20).score(range(USERS))
    return dict(zip(scored.user_ids.tolist(), scored.payloads, strict=True))


def _use(config: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "ENCORE_HOME": str(config.home),
        "ENCORE_REDIS_URL": config.redis_url or "",
        "ENCORE_DATABASE_URL": config.database_url or "",
        "ENCORE_REDIS_PREFIX": config.redis_prefix,
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()


def _start(config: Settings) -> Experiment:
    experiment = Experiment(
        new_experiment_id(),
        "random-v1",
        "random-v2",
        SHARE,
        started_at=datetime.now(UTC),
        offline={"random-v1": {"recall@10": 0.1}, "random-v2": {"recall@10": 0.2}},
    )
    with open_database(config) as db:
        db.start_experiment(experiment)
    return experiment


def test_each_arm_is_served_and_judged_by_its_own_version(settings, monkeypatch):  # noqa: F811
    _bundles(settings)
    experiment = _start(settings)
    record = run_full(settings)

    user_ids = (7 * (np.arange(USERS) + 1)).tolist()
    theirs = challenger_mask(experiment.arm, np.asarray(user_ids))
    assert record.experiment_id == experiment.experiment_id
    assert (record.challenger_version, record.challenger_share) == ("random-v2", SHARE)
    assert record.users_by_version == {
        "random-v1": int((~theirs).sum()),
        "random-v2": int(theirs.sum()),
    }
    assert 0 < theirs.sum() < USERS and record.users_scored == USERS

    lists = {
        "random-v1": _expected(settings, "random-v1"),
        "random-v2": _expected(settings, "random-v2"),
    }
    assert lists["random-v1"] != lists["random-v2"]  # otherwise a label could not be told apart
    _use(settings, monkeypatch)
    with TestClient(create_app()) as api:
        body = api.post("/v1/recommendations", json={"user_ids": user_ids, "n": 20}).json()
        assert body["model_version"] == "random-v1"  # the champion, as before
        labelled = {"random-v1": 0, "random-v2": 0}
        for element, challenger in zip(body["recommendations"], theirs, strict=True):
            version = "random-v2" if challenger else "random-v1"
            assert element["model_version"] == version, element
            labelled[version] += 1
            expected = lists[version].get(element["user_id"])
            if expected is None:  # cold for that version: the run's fallback
                assert element["source"] == "fallback"
            else:
                assert element["source"] == "batch"
                assert element["playlist_ids"] == json.loads(expected)
        assert labelled == record.users_by_version
        challenger_user = user_ids[int(np.argmax(theirs))]
        one = api.get(f"/v1/recommendations/{challenger_user}").json()
        # One user's answer names the version that chose that user's list.
        assert (one["model_version"], one["user_id"]) == ("random-v2", challenger_user)
        assert api.get("/v1/model").json()["challenger"] == experiment.arm.as_json()

        # Views and likes, attributed by the server whatever the client says.
        shown = body["recommendations"][:120]
        for element in shown:
            event = {
                "event_id": str(uuid.uuid4()),
                "user_id": element["user_id"],
                "run_id": body["run_id"],
                "shown_playlist_ids": element["playlist_ids"],
            }
            view = api.post("/v1/feedback", json=event | {"kind": "view"})
            assert view.status_code == 201, view.text
            assert view.json()["model_version"] == element["model_version"]
            assert view.json()["experiment_id"] == experiment.experiment_id
            if element["user_id"] % 3 == 0:
                like = event | {
                    "event_id": str(uuid.uuid4()),
                    "liked_playlist_id": element["playlist_ids"][0],
                }
                assert (
                    api.post("/v1/feedback", json=like).json()["model_version"]
                    == (element["model_version"])
                )
        smuggled = api.post(
            "/v1/feedback",
            json={**event, "event_id": str(uuid.uuid4()), "model_version": "random-v9"},
        )
        assert smuggled.status_code == 422  # a client cannot name the version

        report = api.get("/v1/experiments/current").json()
        by_role = {row["role"]: row for row in report["versions"]}
        for role, version in (("champion", "random-v1"), ("challenger", "random-v2")):
            mine = [e for e in shown if e["model_version"] == version]
            assert by_role[role]["model_version"] == version
            assert by_role[role]["users_viewed"] == by_role[role]["views"] == len(mine)
            likers = sum(1 for e in mine if e["user_id"] % 3 == 0)
            assert by_role[role]["users_liked"] == by_role[role]["likes"] == likers
        assert by_role["challenger"]["offline"]["recall@10"] == 0.2
        gauge = REGISTRY.get_sample_value(
            "encore_experiment_users_viewed",
            {
                "experiment_id": experiment.experiment_id,
                "model_version": "random-v2",
                "role": "challenger",
            },
        )
        assert gauge == by_role["challenger"]["users_viewed"]  # what Grafana shows

    # The CLI prints the same report.
    printed = CliRunner().invoke(cli, ["experiments", "report", "--json"])
    assert printed.exit_code == 0, printed.output
    assert json.loads(printed.output)["versions"] == report["versions"]


def test_a_backfill_keeps_each_user_in_its_arm(settings):  # noqa: F811
    _bundles(settings)
    experiment = _start(settings)
    run = run_full(settings)
    with open_database(settings) as db:
        db.end_experiment("stopped")  # the served run still has its arms
    asked = [7 * (code + 1) for code in range(0, USERS, 3)]
    record = run_backfill(settings, asked)
    assert record.status == "published" and record.target_run_id == run.run_id
    theirs = challenger_mask(Challenger(experiment.experiment_id, "random-v2", SHARE), asked)
    assert record.users_by_version == {
        "random-v1": int((~theirs).sum()),
        "random-v2": int(theirs.sum()),
    }


def test_the_cli_starts_stops_and_ends_an_experiment_by_promotion(settings, monkeypatch):  # noqa: F811
    _bundles(settings)
    _use(settings, monkeypatch)
    runner = CliRunner()

    def encore(*args: str, code: int = 0) -> str:
        result = runner.invoke(cli, list(args))
        assert result.exit_code == code, (result.output, result.exception)
        # A refusal is an EncoreError, which `encore`'s main prints as one line.
        refusal = str(result.exception) if code else ""
        return " ".join((result.output + refusal).split())

    assert "random-v2 challenges random-v1 for 25% of users" in encore(
        "models", "challenge", "random-v2", "--share", "0.25"
    )
    rows = runner.invoke(cli, ["models", "list"]).output.splitlines()
    assert any("champion" in row and "random-v1" in row for row in rows), rows
    assert any("challenger 25%" in row and "random-v2" in row for row in rows), rows
    assert "is running: end it first" in encore("models", "challenge", "random-v2", code=1)
    assert "ended: random-v1 only" in encore("models", "challenge", "--stop")
    assert "no experiment is running" in encore("models", "challenge", "--stop")
    assert "is the champion" in encore("models", "challenge", "random-v1", code=1)

    encore("models", "challenge", "random-v2", "--share", "0.5")
    record = run_full(settings)
    assert set(record.users_by_version) == {"random-v1", "random-v2"}
    promoted = encore("models", "promote", "random-v2")
    assert "ended (promoted random-v2)" in promoted
    report = json.loads(runner.invoke(cli, ["experiments", "report", "--json"]).output)
    assert report["experiment"]["end_reason"] == "promoted random-v2"
    after = run_full(settings)
    assert after.model_version == "random-v2" and after.experiment_id is None
    assert after.users_by_version == {"random-v2": USERS}
