"""Credentials never leave the process: store URLs are masked in messages, logs and answers."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import pytest
from fastapi.testclient import TestClient

from encore.console import configure_logging
from encore.database import RunRecord, open_database
from encore.errors import StoreUnavailable
from encore.redact import RedactingFilter, install_log_redaction, redact
from encore.settings import get_settings
from model_server.app import create_app

SECRET = "Pa55-w0rd_only-here"


# PW stands for the password.
@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("at redis://:PW@10.0.0.1:6379/0 (read)", "at redis://:***@10.0.0.1:6379/0 (read)"),
        ("rediss://default:PW@cache.example:6380/2", "rediss://default:***@cache.example:6380/2"),
        ("postgresql://encore:PW@db:5432/encore?sslmode=require", "postgresql://encore:***@db:5432/encore?sslmode=require"),
        ("postgres://u:PW@h1:5432,h2:5433/db", "postgres://u:***@h1:5432,h2:5433/db"),
        ("unix://:PW@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        ("host=db user=u password=PW dbname=encore", "host=db user=u password=*** dbname=encore"),
        ("host=db password = 'PW with spaces' port=5432", "host=db password = *** port=5432"),
        ("postgresql://db/encore?user=u&password=PW&sslmode=off", "postgresql://db/encore?user=u&password=***&sslmode=off"),
        ("{'host': 'db', 'password': 'PW'}", "{'host': 'db', 'password': '***'}"),
        ('{"password": "PW", "port": 5432}', '{"password": "***", "port": 5432}'),
        # A password holding characters a URL should have escaped is still masked whole.
        ("redis://:PW@PW/PW@host:6379/0 (read)", "redis://:***@host:6379/0 (read)"),
    ],
)  # fmt: skip
def test_passwords_are_masked_and_the_rest_is_kept(text, masked):
    assert redact(text.replace("PW", SECRET)) == masked
    assert redact(masked) == masked  # idempotent


@pytest.mark.parametrize(
    "text",
    [
        "redis://127.0.0.1:6379/0",
        "postgresql://postgres@127.0.0.1:5432/test",
        "https://example.com/path?q=1",
        "Error 111 connecting to 127.0.0.1:6379. Connection refused.",
        "user_ids must be between 0 and 9223372036854775807",
    ],
)
def test_text_without_a_password_is_left_alone(text):
    assert redact(text) == text


def test_store_errors_are_redacted_whoever_raises_them():
    url = f"redis://:{SECRET}@10.0.0.1:6379/0"
    error = StoreUnavailable(f"Redis at {url} is unreachable", component="online_store")
    assert SECRET not in str(error) and "redis://:***@10.0.0.1:6379/0" in str(error)
    assert error.component == "online_store"


@pytest.fixture
def restored_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    encore_level = logging.getLogger("encore").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("encore").setLevel(encore_level)


def test_configured_logging_masks_messages_arguments_and_tracebacks(restored_logging, capsys):
    configure_logging()
    logger = logging.getLogger("encore.test")
    url = f"postgresql://encore:{SECRET}@db:5432/encore"
    logger.warning("cannot reach %s", url)
    logger.warning(f"conninfo host=db password={SECRET}")
    try:
        raise RuntimeError(f"failed on {url}")
    except RuntimeError:
        logger.exception("a failure")
    err = "".join(capsys.readouterr().err.split())  # rich wraps long lines anywhere
    assert SECRET not in err
    assert err.count("postgresql://encore:***@db:5432/encore") == 2  # message and traceback
    assert "password=***" in err and "RuntimeError" in err


def test_handlers_added_later_are_covered_too(restored_logging):
    # uvicorn installs its handlers after the CLI configured logging; the API's startup
    # installs the filter again, on every handler there is then.
    late = logging.getLogger("uvicorn.test-late")
    handler = logging.StreamHandler()
    late.addHandler(handler)
    try:
        install_log_redaction()
        assert any(isinstance(f, RedactingFilter) for f in handler.filters)
        assert any(isinstance(f, RedactingFilter) for f in logging.lastResort.filters)
        install_log_redaction()
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    finally:
        late.removeHandler(handler)


def test_run_records_are_served_without_credentials(monkeypatch):
    # Written by the batch side, served by an unauthenticated route.
    get_settings.cache_clear()
    settings = get_settings()
    error = f"Redis at redis://:{SECRET}@cache:6379/0 is unreachable (write batch)"
    with open_database(settings) as db:
        db.create_run(RunRecord("run-1", "manual", "failed", error=error))
    with TestClient(create_app()) as api:
        for url in ("/v1/runs", "/v1/runs/run-1"):
            response = api.get(url)
            assert response.status_code == 200, response.text
            assert SECRET not in response.text
            assert "redis://:***@cache:6379/0" in response.text


# --------------------------------------------------------------------------------------
# The real server, both stores down, passwords in both URLs
# --------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _call(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


@pytest.mark.slow
def test_no_password_reaches_an_answer_or_the_log_while_the_stores_are_down(tmp_path):
    port = _closed_port()
    env = {
        **os.environ,
        "ENCORE_HOME": str(tmp_path / "home"),
        "ENCORE_REDIS_URL": f"redis://:{SECRET}@127.0.0.1:{_closed_port()}/0",
        "ENCORE_DATABASE_URL": f"postgresql://encore:{SECRET}@127.0.0.1:{_closed_port()}/encore",
        "ENCORE_ADMIN_TOKEN": "admin-token",
        "ENCORE_PORT": str(port),
    }
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "encore", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if _call("GET", f"{base}/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)

        json_type = {"content-type": "application/json"}
        event = (
            f'{{"event_id": "{uuid.uuid4()}", "user_id": 14, "run_id": "r", '
            '"liked_playlist_id": 3, "shown_playlist_ids": [3]}'
        ).encode()
        answers = {
            "readyz": _call("GET", f"{base}/readyz"),
            "recommendations": _call(
                "POST", f"{base}/v1/recommendations", b'{"user_ids": [14]}', json_type
            ),
            "one user": _call("GET", f"{base}/v1/recommendations/14"),
            "model": _call("GET", f"{base}/v1/model"),
            "playlists": _call("GET", f"{base}/v1/playlists?ids=1,2"),
            "feedback": _call("POST", f"{base}/v1/feedback", event, json_type),
            "runs": _call("GET", f"{base}/v1/runs"),
            "one run": _call("GET", f"{base}/v1/runs/r"),
            "start a run": _call(
                "POST",
                f"{base}/v1/runs",
                b"{}",
                json_type | {"authorization": "Bearer admin-token"},
            ),
        }
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    output = "".join(log.read_text().split())  # rich wraps long lines anywhere
    for name, (status, headers, body) in answers.items():
        assert status == 503, (name, status, body)
        assert SECRET not in body and SECRET not in str(headers), name
        if name != "readyz":
            assert '"component":' in body and "retry-after" in {h.lower() for h in headers}
    # The log says what was down, with the URLs masked, and never the password.
    assert SECRET not in output
    assert "online_storeunavailable" in output and "databaseunavailable" in output, output
    assert "redis://:***@127.0.0.1" in output and "postgresql://encore:***@127.0.0.1" in output
