"""The run lifecycle under faults while a run scores, before its flip, on real Redis and Postgres
(and the embedded SQLite where the fault exists there too): a database blip is not a failure, an
outage past the retry budget is, a run that lost its lock to another run does not flip, and
SIGTERM stops `encore run` and `encore scheduler` within 10 s. Nothing takes the served run
away, and every record ends in a state that tells the truth."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest

from encore.database import RunRecord, open_database
from encore.database.postgres import RUN_LOCK_KEY
from encore.errors import RunLocked, StoreUnavailable
from encore.online import open_online_store
from encore.settings import Settings
from scheduler.cron import upkeep
from scheduler.job import run_full
from tests.faults import blip_database, cut_database, restore_database
from tests.lifecycle import USERS, _current, _record, _second_bundle
from tests.lifecycle import servers as servers  # fixtures, imported by name
from tests.lifecycle import settings as settings
from tests.random_bundle import build_random_bundle
from tests.support import publish_random_run

# --------------------------------------------------------------------------------------
# A blip is not a failure; an outage past the budget is
# --------------------------------------------------------------------------------------


def _fault_at_first_batch(fault):
    fired = []

    def progress(stage: str, done: int, total: int) -> None:
        if done > 0 and not fired:
            fired.append(done)
            fault()

    return progress, fired


def test_a_database_blip_while_scoring_does_not_fail_the_run(servers: Settings) -> None:
    first = publish_random_run(servers, users=USERS)
    _second_bundle(servers, users=3000)
    # The blip also ends the session that holds the run lock: the run takes it back.
    progress, fired = _fault_at_first_batch(lambda: blip_database(servers.database_url, 0.4))
    second = run_full(servers, progress=progress)
    assert fired
    assert second.status == "published" and second.users_scored == 3000
    assert _current(servers) == second.run_id != first.run_id


def test_a_database_down_past_the_budget_fails_the_run_and_the_next_start_records_it(
    servers: Settings,
) -> None:
    first = publish_random_run(servers, users=USERS)
    _second_bundle(servers, users=3000)
    budget = servers.model_copy(update={"store_retry_seconds": 1.0})
    progress, _ = _fault_at_first_batch(lambda: cut_database(servers.database_url))
    try:
        with pytest.raises(StoreUnavailable):
            run_full(budget, progress=progress)
        with open_online_store(servers) as store:
            stored = {run.run_id for run in store.runs()}
    finally:
        restore_database(servers.database_url)
    assert stored == {first.run_id}  # the failed run's keyspace was discarded
    assert _current(servers) == first.run_id
    with open_database(servers) as db:
        (dead,) = [r for r in db.list_runs() if r.run_id != first.run_id]
    assert dead.status == "running"  # its record could not say so while the database was down
    upkeep(servers)
    dead = _record(servers, dead.run_id)
    assert dead.status == "failed" and dead.error.startswith("interrupted")


def test_a_run_that_lost_its_lock_to_another_run_does_not_flip(servers: Settings) -> None:
    first = publish_random_run(servers, users=USERS)
    _second_bundle(servers, users=3000)
    thief: list[psycopg.Connection] = []

    def steal_the_lock() -> None:
        blip_database(servers.database_url, 0.1)  # the run's lock session ends
        conn = psycopg.connect(servers.database_url, autocommit=True)
        thief.append(conn)
        (got,) = conn.execute("SELECT pg_try_advisory_lock(%s)", (RUN_LOCK_KEY,)).fetchone()
        assert got

    progress, _ = _fault_at_first_batch(steal_the_lock)
    try:
        with pytest.raises(RunLocked, match="lost the run lock"):
            run_full(servers, progress=progress)
    finally:
        for conn in thief:
            conn.close()
    assert _current(servers) == first.run_id
    with open_database(servers) as db:
        (lost,) = [r for r in db.list_runs() if r.run_id != first.run_id]
    assert lost.status == "failed" and lost.error.startswith("lock_lost")
    with open_online_store(servers) as store:
        assert store.run_info(lost.run_id) is None


# --------------------------------------------------------------------------------------
# Stopping: SIGTERM to `encore run` and to `encore scheduler`
# --------------------------------------------------------------------------------------


def _environment(settings: Settings, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "ENCORE_HOME": str(settings.home),
        "ENCORE_WORKERS": "1",
        "ENCORE_BATCH_SIZE": "100",
        "ENCORE_REDIS_URL": settings.redis_url or "",
        "ENCORE_REDIS_PREFIX": settings.redis_prefix,
        "ENCORE_DATABASE_URL": settings.database_url or "",
        **extra,
    }
    return {k: v for k, v in env.items() if v != ""}


def _wait_for_writes(settings: Settings, process: subprocess.Popen, old: str) -> str:
    deadline = time.monotonic() + 180
    with open_database(settings) as db, open_online_store(settings) as store:
        while time.monotonic() < deadline:
            assert process.poll() is None, "the process ended before it could be stopped"
            running = [r for r in db.list_runs() if r.status == "running"]
            if running and store.count(running[0].run_id) > 0:
                assert store.current().run_id == old
                return running[0].run_id
            time.sleep(0.05)
    raise AssertionError("the run never started writing")


def _big_bundle(settings: Settings) -> None:
    build_random_bundle(
        settings.bundles_dir,
        users=20_000,
        playlists=500,
        candidates=50,
        dim=32,
        version="random-big",
        seed=2,
    )


def _assert_stopped(settings: Settings, run_id: str, served: str, process: subprocess.Popen):
    record = _record(settings, run_id)
    assert record.status == "failed" and record.error.startswith("stopped"), record
    with open_online_store(settings) as store:
        assert store.current().run_id == served
        assert store.run_info(run_id) is None  # its keyspace was discarded
    table = subprocess.run(
        ["ps", "-eo", "pgid=,pid=,stat=,args="], capture_output=True, text=True
    ).stdout
    # Exited children of the dead process stay zombies here (no init reaps them): not alive.
    left = [
        line
        for line in table.splitlines()
        if line.split()[0] == str(process.pid) and not line.split()[2].startswith("Z")
    ]
    assert not left, left  # no scoring worker outlived it


def test_sigterm_stops_encore_run_before_its_flip(settings: Settings) -> None:
    first = publish_random_run(settings, users=USERS)
    _big_bundle(settings)
    process = subprocess.Popen(
        [sys.executable, "-m", "encore", "run"],
        env=_environment(settings),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        run_id = _wait_for_writes(settings, process, first.run_id)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)  # the promise: stopped within 10 s
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = process.stdout.read().decode()
    assert code == 1, output
    assert "stopped" in output
    time.sleep(0.5)  # the workers' exit is reaped by the kernel
    _assert_stopped(settings, run_id, first.run_id, process)


def test_sigterm_stops_the_scheduler_and_its_run(servers: Settings, tmp_path: Path) -> None:
    first = publish_random_run(servers, users=USERS)
    _big_bundle(servers)
    with open_database(servers) as db:
        queued = RunRecord("queued-1", "manual", "queued", created_at=datetime.now(UTC))
        db.enqueue_run(queued)
    with socket_port() as port:
        env = _environment(
            servers, ENCORE_QUEUE_POLL_SECONDS="0.2", ENCORE_SCHEDULER_METRICS_PORT=str(port)
        )
    log = tmp_path / "scheduler.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "encore", "scheduler"],
            env=env,
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        assert _wait_for_writes(servers, process, first.run_id) == "queued-1"
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=10)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert code == 0, log.read_text()
    time.sleep(0.5)
    _assert_stopped(servers, "queued-1", first.run_id, process)


class socket_port:
    """A free TCP port on loopback (closed again before use)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        return None
