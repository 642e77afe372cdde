"""Every PromQL expression of the dashboards and alerts, run against a real Prometheus.

A real `encore scheduler` (catching up: it publishes a run at start) and a real `encore serve`
are scraped by Debian's Prometheus binary while traffic flows; then every expression is sent to
Prometheus' query API. Each must be accepted, and the key panels must return data.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from encore.database import open_database
from encore.settings import Settings
from scheduler.job import run_full
from tests.conftest import IN_CI
from tests.promql import ALERTS, all_expressions
from tests.random_bundle import build_random_bundle

KEY_PANELS = (
    "panel 'Request rate' target A",
    "panel 'p99 POST /v1/recommendations' target A",
    "panel 'Users scored' target A",
    "panel 'Cold fraction' target A",
    "panel 'Users served by source' target A",
    "panel 'Feedback rate by outcome' target A",
    "panel 'Popularity deciles of recommended playlists' target A",
    "panel 'Drift (PSI)' target A",
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post(url: str, body: dict) -> int:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait(what: str, check, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if binary is None:
        message = "the prometheus binary is missing (apt-get install prometheus)"
        if IN_CI:
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    return binary


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    started: list[subprocess.Popen] = []
    yield started
    for process in reversed(started):
        process.terminate()
    for process in started:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _traffic(api: str, run_id: str, rounds: int) -> None:
    for i in range(rounds):
        assert _post(f"{api}/v1/recommendations", {"user_ids": [7, 14, 21, 99999]}) == 200
        assert _get(f"{api}/v1/recommendations/{7 * (i % 50 + 1)}")[0] == 200
        assert _post(f"{api}/v1/recommendations", {"user_ids": ["x"]}) == 422
        event = {
            "event_id": str(uuid.uuid4()),
            "user_id": 14,
            "run_id": run_id,
            "liked_playlist_id": 3,
            "shown_playlist_ids": [3, 4, 5],
        }
        assert _post(f"{api}/v1/feedback", event) == 201
        assert _post(f"{api}/v1/feedback", event) == 200


@pytest.mark.slow
def test_every_dashboard_and_alert_expression_runs_against_live_metrics(
    tmp_path: Path, prometheus_binary: str, processes: list[subprocess.Popen]
) -> None:
    home = tmp_path / "home"
    api_port, scheduler_port, prometheus_port = _free_port(), _free_port(), _free_port()
    env = {
        **os.environ,
        "ENCORE_HOME": str(home),
        "ENCORE_WORKERS": "1",
        "ENCORE_SCHEDULER_METRICS_PORT": str(scheduler_port),
    }
    settings = Settings(home=home, workers=1)
    build_random_bundle(
        settings.bundles_dir,
        users=400,
        playlists=150,
        candidates=20,
        dim=16,
        cold_every=5,
        version="random-v1",
    )
    logs = tmp_path / "logs"
    logs.mkdir()

    def start(name: str, command: list[str]) -> None:
        with (logs / f"{name}.log").open("wb") as log:
            processes.append(
                subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            )

    # No run is published yet, so the scheduler catches up at start.
    start("scheduler", [sys.executable, "-m", "encore", "scheduler"])

    def published() -> bool:
        with open_database(settings) as db:
            return db.last_published() is not None

    _wait("the scheduler's catch-up run", published)
    # A second run gives the drift panels something to compare.
    second = run_full(settings)
    start("api", [sys.executable, "-m", "encore", "serve", "--port", str(api_port)])
    api = f"http://127.0.0.1:{api_port}"
    _wait("the API", lambda: _get(f"{api}/readyz")[0] == 200)

    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "encore-api", "static_configs": [{"targets": [f"127.0.0.1:{api_port}"]}]},
            {
                "job_name": "encore-scheduler",
                "static_configs": [{"targets": [f"127.0.0.1:{scheduler_port}"]}],
            },
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    start(
        "prometheus",
        [
            prometheus_binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ],
    )
    prometheus = f"http://127.0.0.1:{prometheus_port}"

    def query(expr: str) -> dict:
        status, body = _get(f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        return {"http": status, **json.loads(body)}

    def both_up() -> bool:
        result = query('sum(up{job=~"encore-api|encore-scheduler"})')
        return (
            result["status"] == "success"
            and result["data"]["result"]
            and float(result["data"]["result"][0]["value"][1]) == 2
        )

    _wait("Prometheus scraping both targets", both_up, seconds=60)
    # Traffic across several scrapes, so rates and quantiles have two samples to work with.
    for _ in range(6):
        _traffic(api, second.run_id, rounds=5)
        time.sleep(1)

    failures, empty, with_data = [], [], []
    for expression in all_expressions():
        result = query(expression.promql)
        if result.get("status") != "success":
            failures.append(f"{expression.source}: {result.get('error')}")
        elif result["data"]["result"]:
            with_data.append(expression.source)
        else:
            empty.append(expression.source)
    assert not failures, "\n".join(failures)
    missing = [key for key in KEY_PANELS if not any(key in source for source in with_data)]
    assert not missing, f"key panels without data: {missing}; empty: {empty}"
    # What returned nothing is worth reading in the test log: alerts that do not fire,
    # panels about events that did not happen here (5xx, failures, lock contention).
    print(f"{len(with_data)} expressions returned data; empty: {json.dumps(empty, indent=1)}")
