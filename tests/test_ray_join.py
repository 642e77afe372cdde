"""Joining a Ray cluster that is already running (``ENCORE_RAY_ADDRESS``), as a nightly job on
a real cluster does: a head started with ``ray start --head``, then ``encore run --engine ray``
in its own process. The run joins that cluster and leaves it running; without an address, the
run starts a Ray of its own even though one runs on the machine. The head requires a token, as
Ray clusters do by default from Ray 2.61 (2.59 for local ones): the run authenticates through
Ray's own ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN``. Needs ``uv sync --extra ray``: without Ray
this skips, under CI=true it fails."""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from encore.online import open_online_store
from encore.settings import Settings
from tests.conftest import IN_CI
from tests.random_bundle import build_random_bundle
from tests.redis_server import _free_port

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).parent / "ray"
USERS = 400
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _environment(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("ENCORE_", "RAY_"))}
    return {**keep, **AUTH, **extra}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory) -> Iterator[str]:
    """A one-CPU Ray head on a free port (not 6379: that is Redis's), stopped at the end."""
    if importlib.util.find_spec("ray") is None:
        message = "Ray is not installed: `uv sync --extra ray`"
        if IN_CI:
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    with log.open("wb") as out:
        head = subprocess.Popen(
            [
                str(RAY),
                "start",
                "--head",
                "--block",
                f"--port={port}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=1",
                "--include-dashboard=false",
                "--disable-usage-stats",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_environment(),
            start_new_session=True,  # its processes in one group, stopped together
        )
    try:
        _wait_for_head(address, head, log)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def _wait_for_head(address: str, head: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"`ray start --head` exited {head.returncode}:\n{log.read_text()}")
        status = _status(address)
        if status.returncode == 0 and "CPU" in status.stdout:
            return
        time.sleep(1)
    pytest.fail(f"the Ray head at {address} did not come up in 90 s:\n{log.read_text()}")


def _status(address: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(RAY), "status", f"--address={address}"],
        capture_output=True,
        text=True,
        env=_environment(),
    )


def _encore_run(home: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "encore", "run"],
        capture_output=True,
        text=True,
        env=_environment(ENCORE_HOME=str(home), ENCORE_ENGINE="ray", **env),
        timeout=300,
    )


def _published(run: subprocess.CompletedProcess) -> str:
    """The run id `encore run` reports as published."""
    found = re.search(r"run (\S+) \(manual\) published", run.stdout + run.stderr)
    assert found, run.stderr[-3000:]
    return found.group(1)


def test_a_run_joins_a_running_cluster_and_leaves_it_running(ray_head: str, tmp_path: Path):
    home = tmp_path / "home"
    settings = Settings(home=home)
    build_random_bundle(settings.bundles_dir, users=USERS, playlists=90, candidates=20, dim=16)

    joined = _encore_run(home, ENCORE_RAY_ADDRESS=ray_head)
    assert joined.returncode == 0, joined.stderr[-3000:]
    port = ray_head.rsplit(":", 1)[1]
    connected = re.search(
        r"Connecting to existing Ray cluster at address: \S+?:(\d+)", joined.stderr
    )
    assert connected and connected.group(1) == port, joined.stderr[-3000:]

    # Without an address, a Ray of the run's own, not the head above.
    own = _encore_run(home)
    assert own.returncode == 0, own.stderr[-3000:]
    assert "Connecting to existing Ray cluster" not in own.stderr
    assert "Started a local Ray instance" in own.stderr

    assert _status(ray_head).returncode == 0, "the joined cluster was stopped by the run"
    ids = [7 * (code + 1) for code in range(USERS)]
    with open_online_store(settings) as store:
        first, second = (store.read(_published(run), ids) for run in (joined, own))
    assert sum(p is not None for p in first) == USERS
    assert first == second
