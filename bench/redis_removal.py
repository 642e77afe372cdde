"""How long Redis stops answering while a large run is removed: the longest PING during the
discard (UNLINK) of a run, and during the expiry of a replaced run at the end of its grace,
written with the store as the nightly run writes it. For comparison, the same lists in one
hash (the layout before buckets) removed with DEL, as an expiry without lazy freeing does.
Uses a key prefix of its own and removes what it wrote. Prints one JSON line.

    uv run python bench/redis_removal.py --users 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid

import redis

from encore.online.redis_store import RedisOnlineStore


class LongestPing:
    """PINGs the server in a loop on a connection of its own; keeps the slowest answer."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=30)
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            clock = time.perf_counter()
            self.client.ping()
            self.longest = max(self.longest, time.perf_counter() - clock)
            time.sleep(0.0005)

    def __enter__(self) -> LongestPing:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()


def write_run(store: RedisOnlineStore, run_id: str, users: int, payload: bytes) -> float:
    clock = time.perf_counter()
    store.begin_run(run_id, model_version="bench", top_n=20, fallback=b"[1]")
    for start in range(0, users, 1000):
        ids = range(start, min(start + 1000, users))
        store.write_batch(run_id, ids, [payload] * len(ids))
    return time.perf_counter() - clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--buckets", type=int, default=1024)
    parser.add_argument("--spread", type=float, default=60.0, help="Seconds expiry spreads over.")
    parser.add_argument(
        "--one-hash",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Also the old one-hash layout, DEL (at 10M users Redis blocks for seconds).",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("ENCORE_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    # A top-20 list of realistic ids: about what a user's list weighs in production.
    payload = b"[" + b",".join(str(100_000 + 7919 * i).encode() for i in range(20)) + b"]"
    prefix = f"bench-removal-{uuid.uuid4().hex[:8]}"
    admin = redis.Redis.from_url(args.redis_url)
    lazy_expire = admin.config_get("lazyfree-lazy-expire").get("lazyfree-lazy-expire")
    store = RedisOnlineStore(args.redis_url, prefix=prefix, buckets=args.buckets)
    try:
        written = write_run(store, "big", args.users, payload)
        store.publish("big", users_total=args.users, cold_users=0, grace_seconds=3600)
        used_mb = admin.info("memory")["used_memory"] / 2**20
        # Discard: a second run becomes current, then the big one is removed (UNLINK).
        write_run(store, "small", 1, payload)
        store.publish("small", users_total=1, cold_users=0, grace_seconds=3600)
        with LongestPing(args.redis_url) as discard_ping:
            clock = time.perf_counter()
            assert store.discard("big")
            discard_s = time.perf_counter() - clock
            time.sleep(0.5)  # the background thread frees the memory meanwhile
        # Expiry: the big run replaced, its grace ends; the server expires its keys itself,
        # spread over --spread seconds (production: 600 s for the same number of buckets).
        store.expiry_spread_seconds = args.spread
        write_run(store, "big", args.users, payload)
        store.publish("big", users_total=args.users, cold_users=0, grace_seconds=3600)
        remaining = admin.dbsize() - admin.exists(store.keys.meta("big"), *store._data_keys("big"))
        with LongestPing(args.redis_url) as expire_ping:
            store.publish("small", users_total=1, cold_users=0, grace_seconds=1)
            clock = time.perf_counter()
            # DBSIZE, not EXISTS: touching an expired key frees it in that command, which
            # would measure this loop rather than the server's own expiry.
            while admin.dbsize() > remaining:
                time.sleep(0.01)
                assert time.perf_counter() - clock < 600, "the run's keys never expired"
            expire_s = time.perf_counter() - clock
        # The layout before buckets: one hash, removed in the foreground (DEL, or an expiry
        # without lazyfree-lazy-expire).
        single_ms = None
        if args.one_hash:
            single = f"{prefix}:single"
            for start in range(0, args.users, 10_000):
                stop = min(start + 10_000, args.users)
                admin.hset(single, mapping={i: payload for i in range(start, stop)})
            with LongestPing(args.redis_url) as single_ping:
                admin.delete(single)
                time.sleep(0.2)
            single_ms = round(single_ping.longest * 1000, 1)
    finally:
        for key in admin.scan_iter(f"*{prefix}*", count=1000):
            admin.unlink(key)
        store.close()
    print(
        json.dumps(
            {
                "users": args.users,
                "buckets": args.buckets,
                "used_memory_mb": round(used_mb),
                "write_s": round(written, 2),
                "lazyfree_lazy_expire": lazy_expire,
                "discard_s": round(discard_s, 3),
                "discard_max_ping_ms": round(discard_ping.longest * 1000, 1),
                "expiry_spread_s": args.spread,
                "expiry_s": round(expire_s, 2),
                "expiry_max_ping_ms": round(expire_ping.longest * 1000, 1),
                "one_hash_del_max_ping_ms": single_ms,
            }
        )
    )


if __name__ == "__main__":
    main()
