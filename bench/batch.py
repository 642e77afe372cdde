"""Benchmark of the nightly run into Redis, against the Redis write floor and a naive path.

Builds a bundle of the real ranking model's architecture with random weights and pairings
made directly (no training): N users x 75 candidates, dim 128, top-10. Then, in this one
process: (a) a full run into Redis (spawn pool, batches, pipelined writes, verify, publish);
(b) the write floor: redis-py pipelined SET of the same payloads and nothing else; (c) a naive
path scoring, encoding and writing one user at a time, on a sample. With
``--challenger-share S``, a second bundle (same users, other weights) challenges the first for
that share of users, and runs with and without it alternate ``--pairs`` times: the figure is
the median ratio of their durations (an experiment's cost). With ``--engine ray``, runs of the
local engine and of the Ray engine alternate ``--pairs`` times: the median ratio of their wall
times, and whether a sample of users got the same lists. The Ray engine joins the cluster at
``--ray-address`` (ENCORE_RAY_ADDRESS), as a nightly job on a Ray cluster does; without one it
starts a local Ray for each run and stops it after, and that time counts. Prints one JSON line.

    uv run python bench/batch.py --users 1000000
    uv run python bench/batch.py --users 1000000 --challenger-share 0.1
    uv run --extra ray python bench/batch.py --users 1000000 --engine ray
    uv run ray start --head --port 6390   # not 6379, Redis's port
    uv run --extra ray python bench/batch.py --users 1000000 --engine ray --ray-address auto
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import redis

from encore.settings import Settings
from scheduler.job import run_full

REPO = Path(__file__).resolve().parents[1]


def _build(
    home: Path,
    users: int,
    playlists: int,
    candidates: int,
    dim: int,
    *,
    version: str = "random-v1",
    seed: int = 0,
) -> str:
    sys.path.insert(0, str(REPO))  # the test fixtures: tests/random_bundle.py
    from tests.random_bundle import build_random_bundle

    bundle = build_random_bundle(
        home / "bundles",
        users=users,
        playlists=playlists,
        candidates=candidates,
        dim=dim,
        version=version,
        seed=seed,
        promote_it=version == "random-v1",  # the challenger is not promoted
    )
    return bundle.version


def experiment_cost(settings: Settings, share: float, pairs: int) -> dict:
    """Runs without and with a challenger, alternated: their durations and median ratio."""
    from datetime import UTC, datetime

    from encore.database import open_database
    from encore.experiments import Experiment, new_experiment_id

    alone, together, split = [], [], {}
    for _ in range(pairs):
        clock = time.perf_counter()
        run_full(settings, kind="manual")
        alone.append(time.perf_counter() - clock)
        with open_database(settings) as db:
            db.start_experiment(
                Experiment(
                    new_experiment_id(),
                    "random-v1",
                    "random-v2",
                    share,
                    started_at=datetime.now(UTC),
                )
            )
        clock = time.perf_counter()
        record = run_full(settings, kind="manual")
        together.append(time.perf_counter() - clock)
        split = record.users_by_version or {}
        with open_database(settings) as db:
            db.end_experiment("benchmark")
    ratios = sorted(t / a for a, t in zip(alone, together, strict=True))
    return {
        "challenger_share": share,
        "without_s": [round(x, 2) for x in alone],
        "with_s": [round(x, 2) for x in together],
        "ratio_with_to_without": round(ratios[len(ratios) // 2], 3),
        "ratios": [round(r, 3) for r in ratios],
        "users_by_version": split,
    }


class TreeMemory:
    """Peak of the summed RSS (and PSS) of this process and its children, sampled."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _tree(pid: int) -> list[int]:
        pids = [pid]
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            for child in task.read_text().split():
                pids.extend(TreeMemory._tree(int(child)))
        return pids

    @staticmethod
    def _kb(pid: int, path: str, field: str) -> int:
        try:
            for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
                if line.startswith(field):
                    return int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
        return 0

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            pids = self._tree(os.getpid())
            self.peak_rss = max(self.peak_rss, sum(self._kb(p, "status", "VmRSS:") for p in pids))
            # smaps_rollup walks page tables under the process's mmap lock and stalls its
            # page faults: read it twenty times less often than the cheap VmRSS.
            if tick % 20 == 0:
                self.peak_pss = max(
                    self.peak_pss, sum(self._kb(p, "smaps_rollup", "Pss:") for p in pids)
                )
            tick += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def ray_against_local(settings: Settings, local_run: str, users: int, pairs: int) -> dict:
    """Local and Ray runs alternated ``pairs`` times: the median of their ratios, and whether a
    sample of users got the same lists from both engines."""
    from encore.online import open_online_store
    from encore.ray_cluster import join_ray
    from scheduler.ray_engine import actor_count, import_ray

    ray_settings = settings.model_copy(update={"engine": "ray"})
    ratios, local_seconds, ray_seconds, published = [], [], [], True
    for _ in range(pairs):
        clock = time.perf_counter()
        run_full(settings, kind="manual")
        local_seconds.append(time.perf_counter() - clock)
        clock = time.perf_counter()
        record = run_full(ray_settings, kind="manual")
        ray_seconds.append(time.perf_counter() - clock)
        ratios.append(ray_seconds[-1] / local_seconds[-1])
        published = published and record.status == "published"
    sample = np.random.default_rng(2).choice(users, min(users, 20_000), replace=False)
    ids = (7 * (sample + 1)).tolist()
    with open_online_store(settings) as store:
        identical = store.read(local_run, ids) == store.read(record.run_id, ids)
    ray = import_ray()
    join_ray(settings.ray_address)
    actors = actor_count(ray_settings)
    ray.shutdown()  # a joined cluster keeps running: this only disconnects
    return {
        "ray_address": settings.ray_address or "local Ray started per run",
        "ray_pairs": pairs,
        "local_seconds": [round(s, 2) for s in local_seconds],
        "ray_seconds": [round(s, 2) for s in ray_seconds],
        "ray_to_local": round(statistics.median(ratios), 3),
        "ray_actors": actors,
        "ray_identical_sample": identical,
        "ray_published": published,
    }


def stored_lists(client: redis.Redis, settings: Settings, run_id: str) -> dict[bytes, bytes]:
    from encore.online.redis_keys import PLACEHOLDER, Keys

    keys = Keys(settings.redis_prefix)
    payloads: dict[bytes, bytes] = {}
    for bucket in range(int(client.hget(keys.meta(run_id), "buckets"))):
        payloads.update(client.hgetall(keys.bucket(run_id, bucket)))
    payloads.pop(PLACEHOLDER, None)
    return payloads


def write_floor(client: redis.Redis, payloads: dict[bytes, bytes], batch: int) -> float:
    keys = list(payloads)
    clock = time.perf_counter()
    for start in range(0, len(keys), batch):
        pipe = client.pipeline(transaction=False)
        for key in keys[start : start + batch]:
            pipe.set(b"floor:" + key, payloads[key])
        pipe.execute()
    seconds = time.perf_counter() - clock
    for start in range(0, len(keys), 10_000):
        client.delete(*[b"floor:" + k for k in keys[start : start + 10_000]])
    return seconds


def naive(home: Path, version: str, client: redis.Redis, sample: int, top_n: int) -> float:
    """Seconds per user when each user is scored, encoded and written on its own."""
    import torch

    from encore.bundle import open_bundle
    from inference import load_model

    torch.set_num_threads(1)
    scorer = load_model(open_bundle(home / "bundles", version), top_n=top_n)
    codes = np.random.default_rng(1).choice(len(scorer.user_ids), sample, replace=False)
    clock = time.perf_counter()
    for code in codes:
        result = scorer.score(np.array([code]))
        for user, payload in zip(result.user_ids, result.payloads, strict=True):
            client.set(f"naive:{user}", payload)
    seconds = (time.perf_counter() - clock) / sample
    client.delete(*[f"naive:{u}" for u in scorer.user_ids[codes]])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--playlists", type=int, default=100_000)
    parser.add_argument("--candidates", type=int, default=75)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--top-n", type=int, default=10)
    parser.add_argument("--naive-sample", type=int, default=2000)
    parser.add_argument("--challenger-share", type=float, default=0.0)
    parser.add_argument("--pairs", type=int, default=3, help="Runs with and without, each.")
    parser.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="ray: the Ray engine's run too, after the local one (needs --extra ray).",
    )
    parser.add_argument(
        "--ray-address",
        default=os.environ.get("ENCORE_RAY_ADDRESS"),
        help="A running Ray cluster to join (auto or host:port); unset: a local Ray per run.",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("ENCORE_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()

    client = redis.Redis.from_url(args.redis_url)
    with tempfile.TemporaryDirectory(prefix="encore-bench-") as tmp:
        home = Path(tmp)
        # Built in a child process, so this process's memory holds only what the run needs.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            version = child.submit(
                _build, home, args.users, args.playlists, args.candidates, args.dim
            ).result()
            if args.challenger_share:
                child.submit(
                    _build,
                    home,
                    args.users,
                    args.playlists,
                    args.candidates,
                    args.dim,
                    version="random-v2",
                    seed=1,
                ).result()
        settings = Settings(
            home=home, redis_url=args.redis_url, top_n=args.top_n, ray_address=args.ray_address
        )
        if args.challenger_share:
            print(
                json.dumps(
                    {
                        "users": args.users,
                        **experiment_cost(settings, args.challenger_share, args.pairs),
                    }
                )
            )
            return
        with TreeMemory() as memory:
            clock = time.perf_counter()
            record = run_full(settings, kind="manual")
            seconds = time.perf_counter() - clock
        payloads = stored_lists(client, settings, record.run_id)
        floor = write_floor(client, payloads, settings.batch_size)
        per_user_naive = naive(home, version, client, args.naive_sample, args.top_n)
        engine = {}
        if args.engine == "ray":
            engine = ray_against_local(settings, record.run_id, args.users, args.pairs)
    print(
        json.dumps(
            {
                "users": args.users,
                "seconds": round(seconds, 2),
                "users_per_s": round(args.users / seconds),
                "write_floor_s": round(floor, 2),
                "ratio_to_floor": round(seconds / floor, 2),
                "naive_users_per_s": round(1 / per_user_naive),
                "speedup_vs_naive": round(per_user_naive * args.users / seconds, 1),
                "peak_rss_mb": round(memory.peak_rss / 1024),
                "peak_pss_mb": round(memory.peak_pss / 1024),
                "workers": settings.workers,
                "batch_size": settings.batch_size,
                "published": record.status == "published",
                **engine,
            }
        )
    )


if __name__ == "__main__":
    main()
