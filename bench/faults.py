"""Figures of the run lifecycle under faults, on real Redis and Postgres. Prints one JSON line.

- ``sigterm_stop_s``: seconds from SIGTERM to the exit of an `encore run` that is writing
  (min / median / max over ``--repeat`` runs); each stopped run must end ``failed``
  ("stopped") with its keyspace gone and the previous run still served.
- ``blip_ratio``: the duration of a run during which Postgres is unreachable for
  ``--blip`` seconds (sessions ended, connections refused: what a restart does to a
  database), over the duration of the same run without it, pair by pair; every run must
  publish.
- ``readyz_database_down_s``: how long `GET /readyz` of a running `encore serve` takes to
  answer while Postgres is unreachable (it must answer 200 "degraded"), against the same probe
  with everything up; recommendations must stay 200 meanwhile.

    uv run python bench/faults.py --users 200000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psycopg

from encore.database import open_database
from encore.online import open_online_store
from encore.settings import Settings
from scheduler.job import run_full

REPO = Path(__file__).resolve().parents[1]


def _database(admin_url: str) -> str:
    name = f"encore_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return psycopg.conninfo.make_conninfo(admin_url, dbname=name)


def _drop(admin_url: str, url: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _blip(admin_url: str, url: str, seconds: float) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        time.sleep(seconds)
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def _cut(admin_url: str, url: str, allow: bool) -> None:
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}')
        if not allow:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )


def _get(url: str, body: bytes | None = None) -> tuple[int, dict, float]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    clock = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    return status, json.loads(payload), time.perf_counter() - clock


def _readyz(env: dict[str, str], admin_url: str, database_url: str, probes: int) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "encore", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if _get(f"{base}/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        up = [_get(f"{base}/readyz") for _ in range(probes)]
        assert all(status == 200 for status, _, _ in up), up[-1]
        _cut(admin_url, database_url, allow=False)
        try:
            down = [_get(f"{base}/readyz") for _ in range(probes)]
            served = _get(f"{base}/v1/recommendations", b'{"user_ids": [7, 14]}')
        finally:
            _cut(admin_url, database_url, allow=True)
        assert all(s == 200 and b["status"] == "degraded" for s, b, _ in down), down[-1]
        assert served[0] == 200, served
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "readyz_up_s": statistics.median(t for _, _, t in up),
        "readyz_database_down_s": [t for _, _, t in down],
    }


def _stop_once(settings: Settings, env: dict[str, str]) -> float:
    with open_online_store(settings) as store:
        served = store.current().run_id
    process = subprocess.Popen(
        [sys.executable, "-m", "encore", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    with open_database(settings) as db, open_online_store(settings) as store:
        while True:
            if process.poll() is not None:
                raise SystemExit("the run ended before it could be stopped: give more --users")
            running = [r for r in db.list_runs(limit=5) if r.status == "running"]
            if running and store.count(running[0].run_id) > 0:
                run_id = running[0].run_id
                break
            time.sleep(0.02)
        clock = time.perf_counter()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        seconds = time.perf_counter() - clock
        record = db.get_run(run_id)
        assert record.status == "failed" and record.error.startswith("stopped"), record
        assert store.run_info(run_id) is None and store.current().run_id == served
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--playlists", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--blip", type=float, default=0.4, help="seconds Postgres is away")
    parser.add_argument("--probes", type=int, default=20, help="/readyz probes")
    parser.add_argument(
        "--redis-url", default=os.environ.get("ENCORE_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("ENCORE_DATABASE_URL", "postgresql://postgres@127.0.0.1/postgres"),
        help="a database to create the benchmark's own database from",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # the test fixtures: tests/random_bundle.py
    from tests.random_bundle import build_random_bundle

    database_url = _database(args.postgres_url)
    try:
        with tempfile.TemporaryDirectory(prefix="encore-faults-") as tmp:
            settings = Settings(
                home=Path(tmp),
                redis_url=args.redis_url,
                redis_prefix=f"encore-faults-{uuid.uuid4().hex[:8]}",
                database_url=database_url,
            )
            with open_database(settings) as db:
                db.upgrade()
            build_random_bundle(
                settings.bundles_dir, users=args.users, playlists=args.playlists, dim=64
            )
            run_full(settings)
            env = {
                **os.environ,
                "ENCORE_HOME": tmp,
                "ENCORE_REDIS_URL": settings.redis_url,
                "ENCORE_REDIS_PREFIX": settings.redis_prefix,
                "ENCORE_DATABASE_URL": database_url,
            }
            ready = _readyz(env, args.postgres_url, database_url, args.probes)
            stops = [_stop_once(settings, env) for _ in range(args.repeat)]
            ratios = []
            for _ in range(args.repeat):
                clock = time.perf_counter()
                assert run_full(settings).status == "published"
                plain = time.perf_counter() - clock

                fired = threading.Event()

                def progress(stage: str, done: int, total: int, fired=fired) -> None:
                    if done > total // 4 and not fired.is_set():
                        fired.set()
                        threading.Thread(
                            target=_blip, args=(args.postgres_url, database_url, args.blip)
                        ).start()

                clock = time.perf_counter()
                assert run_full(settings, progress=progress).status == "published"
                ratios.append((time.perf_counter() - clock) / plain)
                assert fired.is_set()
            with open_online_store(settings) as store:
                for run in store.runs():
                    store.discard(run.run_id)
                store.client.delete(store.keys.current)
    finally:
        _drop(args.postgres_url, database_url)

    def spread(values: list[float]) -> dict[str, float]:
        return {
            "min": round(min(values), 2),
            "median": round(statistics.median(values), 2),
            "max": round(max(values), 2),
        }

    print(
        json.dumps(
            {
                "users": args.users,
                "repeat": args.repeat,
                "sigterm_stop_s": spread(stops),
                "blip_seconds": args.blip,
                "blip_ratio": spread(ratios),
                "runs_published_through_a_blip": len(ratios),
                "readyz_up_s": round(ready["readyz_up_s"], 4),
                "readyz_database_down_s": spread(ready["readyz_database_down_s"]),
            }
        )
    )


if __name__ == "__main__":
    main()
