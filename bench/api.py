"""Benchmark of the API on a published run, driven by wrk from a separate process.

Publishes a run of N users (a random-weight bundle, into Redis when reachable, else SQLite),
starts `encore serve` (one uvicorn process), and drives it with wrk (Debian's package):
GET /healthz, POST /v1/recommendations with 10 ids (all hits) and with 1000 ids at moderate
load. Prints one JSON line: req/s and p50/p99 per route, and the 10-id route's throughput as
a ratio of /healthz on the same server in the same run.

    uv run python bench/api.py --users 100000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LUA = """
math.randomseed(%(seed)d)
local users, count = %(users)d, %(count)d
request = function()
  local ids = {}
  for i = 1, count do ids[i] = 7 * math.random(1, users) end
  local body = '{"user_ids":[' .. table.concat(ids, ",") .. ']}'
  return wrk.format("POST", "/v1/recommendations", {["Content-Type"] = "application/json"}, body)
end
response = function(status, headers, body)
  if status ~= 200 then error("status " .. status) end
end
"""
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wrk(url: str, *, connections: int, seconds: int, script: Path | None = None) -> dict:
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if script:
        command[1:1] = ["-s", str(script)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "error" in out.lower():
        raise RuntimeError(f"wrk saw errors:\n{out}")
    latency = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.MULTILINE))

    def ms(text: str) -> float:
        number, unit = re.match(r"([\d.]+)(\w+)", text).groups()
        return round(float(number) * UNITS[unit], 3)

    return {
        "req_per_s": round(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))),
        "p50_ms": ms(latency["50"]),
        "p99_ms": ms(latency["99"]),
        "connections": connections,
    }


def _challenge(settings, users: int, share: float) -> None:
    from datetime import UTC, datetime

    from encore.database import open_database
    from encore.experiments import Experiment, new_experiment_id
    from tests.random_bundle import build_random_bundle

    build_random_bundle(
        settings.bundles_dir,
        users=users,
        playlists=20_000,
        dim=32,
        version="challenger",
        seed=1,
        promote_it=False,
    )
    with open_database(settings) as db:
        db.start_experiment(
            Experiment(
                new_experiment_id(), "random", "challenger", share, started_at=datetime.now(UTC)
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--challenger-share",
        type=float,
        default=0.0,
        help="Publish the run with a challenger for this share of users (labels cost).",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("ENCORE_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")

    import redis

    from encore.settings import Settings
    from scheduler.job import run_full

    sys.path.insert(0, str(REPO))  # the test fixtures: tests/random_bundle.py
    from tests.random_bundle import build_random_bundle

    try:
        redis.Redis.from_url(args.redis_url).ping()
        redis_url = args.redis_url
    except redis.RedisError:
        redis_url = None
    with tempfile.TemporaryDirectory(prefix="encore-bench-api-") as tmp:
        home = Path(tmp)
        prefix = f"bench-api-{os.getpid()}"
        settings = Settings(home=home, redis_url=redis_url, redis_prefix=prefix)
        build_random_bundle(home / "bundles", users=args.users, playlists=20_000, dim=32)
        if args.challenger_share:
            _challenge(settings, args.users, args.challenger_share)
        run_full(settings)
        port = free_port()
        env = {**os.environ, "ENCORE_HOME": str(home), "ENCORE_REDIS_PREFIX": prefix}
        if redis_url:
            env["ENCORE_REDIS_URL"] = redis_url
        server = subprocess.Popen(
            [sys.executable, "-m", "encore", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    with urllib.request.urlopen(f"{base}/readyz", timeout=1) as response:
                        if response.status == 200:
                            break
                except OSError:
                    time.sleep(0.2)
            scripts = {}
            for count in (10, 1000):
                scripts[count] = home / f"post{count}.lua"
                scripts[count].write_text(
                    LUA % {"seed": count, "users": args.users, "count": count}
                )
            wrk(f"{base}/healthz", connections=args.connections, seconds=2)  # warm up
            results = {
                "healthz": wrk(
                    f"{base}/healthz", connections=args.connections, seconds=args.seconds
                ),
                "post_10_ids": wrk(
                    base, connections=args.connections, seconds=args.seconds, script=scripts[10]
                ),
                "post_1000_ids": wrk(
                    base, connections=4, seconds=args.seconds, script=scripts[1000]
                ),
            }
        finally:
            server.terminate()
            server.wait(timeout=30)
            if redis_url:
                client = redis.Redis.from_url(redis_url)
                for key in client.scan_iter(f"{prefix}:*"):
                    client.unlink(key)
    print(
        json.dumps(
            {
                "users": args.users,
                "store": "redis" if redis_url else "sqlite",
                "challenger_share": args.challenger_share,
                **{
                    f"{route}_{k}": v
                    for route, figures in results.items()
                    for k, v in figures.items()
                },
                "ratio_10_ids_to_healthz": round(
                    results["post_10_ids"]["req_per_s"] / results["healthz"]["req_per_s"], 3
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
