"""The OpenAPI schema tells the truth about the API: schemathesis (every check, every phase)
against the real server on both stacks, and the details a generator would not notice."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from model_server.app import create_app
from tests.live import live_server
from tests.test_api import (
    BACKENDS,
    MAX_ID,
    TOP_N,
    Backend,
    published_backend,
    use_backend,
    validation_errors,
)

TOKEN = "schema-test-token"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
# Every check schemathesis has (not on the command line: --checks would override the
# operation's exception below). RunRequest refuses user_ids with kind "manual" and its schema
# does not say so (POST /v1/runs is being rewritten): every other check runs on it.
SCHEMATHESIS_CONFIG = """
[checks]
enabled = true

[[operations]]
include-path = "/v1/runs"
include-method = "POST"
checks.positive_data_acceptance.enabled = false
"""


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Backend]:
    with published_backend(request.param, tmp_path_factory.mktemp("schema") / "home") as b:
        yield b


@pytest.fixture
def api(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    use_backend(monkeypatch, backend)
    with TestClient(create_app()) as client:
        yield client


class _Started:
    """What the stubbed launcher returns: a run process that has already finished."""

    def poll(self) -> int:
        return 0


@pytest.mark.slow
def test_schemathesis_finds_nothing(backend, monkeypatch, tmp_path):
    use_backend(monkeypatch, backend, ENCORE_ADMIN_TOKEN=TOKEN)
    # Accepted POST /v1/runs would start `encore run` processes; the records are enough.
    monkeypatch.setattr(
        "model_server.routes.runs.launch_run", lambda *a, **k: _Started(), raising=False
    )
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
        )
    output = result.stdout[-20_000:] + result.stderr[-5_000:]
    data = json.loads(report.read_text())
    assert data["failures"] == [], output
    assert data["errors"] == [], output
    assert {name: ops for name, ops in data["warnings"].items() if ops} == {}, output
    assert data["exit_code"] == 0 and result.returncode == 0, output
    assert data["complete"] and data["stop_reason"] == "completed", output
    # It tested something: every operation, in every phase that applies, many cases.
    assert data["operations"]["tested"] == data["operations"]["selected"] == 10, output
    assert data["test_cases"]["generated"] >= 500, data["test_cases"]
