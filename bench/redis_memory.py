"""Redis memory per user: `used_memory` before and after a nightly run of N users into Redis
(a random-weight bundle of the ranker's architecture, top-20 lists, the store's buckets).
Uses a key prefix of its own and removes what it wrote. Run it on an otherwise idle Redis:
the figure is the server's whole memory delta. Prints one JSON line.

    uv run python bench/redis_memory.py --users 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import redis

from encore.settings import Settings
from scheduler.job import run_full

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--top-n", type=int, default=20)
    parser.add_argument(
        "--redis-url", default=os.environ.get("ENCORE_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # the test fixtures: tests/random_bundle.py
    from tests.random_bundle import build_random_bundle

    client = redis.Redis.from_url(args.redis_url)
    prefix = f"bench-memory-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="encore-bench-memory-") as tmp:
        home = Path(tmp)
        build_random_bundle(home / "bundles", users=args.users, playlists=100_000, dim=32)
        settings = Settings(
            home=home, redis_url=args.redis_url, redis_prefix=prefix, top_n=args.top_n
        )
        before = client.info("memory")["used_memory"]
        clock = time.perf_counter()
        record = run_full(settings)
        seconds = time.perf_counter() - clock
        after = client.info("memory")["used_memory"]
        for pattern in (f"{prefix}:*", f"{{{prefix}}}:*"):
            for key in client.scan_iter(pattern, count=1000):
                client.unlink(key)
    print(
        json.dumps(
            {
                "users": args.users,
                "lists": record.users_scored - record.cold_users,
                "top_n": args.top_n,
                "used_memory_delta_mb": round((after - before) / 2**20, 1),
                "bytes_per_user": round((after - before) / args.users, 1),
                "run_seconds": round(seconds, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
