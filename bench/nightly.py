"""Benchmark of the nightly pipeline with fresh data: ingest, refresh, score, publish into Redis.

Generates (or reuses, from ``--cache``) N users x P playlists as the first partition of an
``ENCORE_INTERACTIONS`` directory, with a model of the real ranker's architecture (random
weights: the figures are times, not quality). Night 0 ingests everything and refreshes in full.
Night 1 adds a partition of ``--new-share`` new interactions (existing users' and a few new
users') and runs the whole pipeline as the scheduler does (an incremental refresh). The
baseline, in the same run: a full refresh of the same data from the same base. Prints one JSON
line: the night's phases and total, and full refresh / incremental refresh.

    uv run python bench/nightly.py --users 1000000 --playlists 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pairing import cached_data, default_playlists


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--playlists", type=int, default=None)
    parser.add_argument("--new-share", type=float, default=0.01, help="new rows / rows")
    parser.add_argument("--new-users", type=float, default=0.001, help="new users / users")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "encore-bench")
    parser.add_argument(
        "--redis-url", default=os.environ.get("ENCORE_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args()
    playlists = args.playlists or default_playlists(args.users)
    data = cached_data(args.cache, args.users, playlists, args.seed)

    from encore.bundle import promoted_bundle
    from encore.cli.ingest import night_preparation
    from encore.database import open_database
    from encore.settings import Settings
    from scheduler.job import run_full
    from tests.random_bundle import build_random_bundle
    from training.freshness import liked_pairs
    from training.refresh import refresh_bundle
    from training.source import ingest, with_likes

    home = Path(tempfile.mkdtemp(prefix="encore-nightly-bench-"))
    source = home / "interactions"
    source.mkdir()
    if _same_fs(data, source):
        os.link(data, source / "night-0.parquet")
    else:
        shutil.copy(data, source / "night-0.parquet")
    prefix = f"bench-nightly-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        home=home,
        redis_url=args.redis_url,
        redis_prefix=prefix,
        interactions=source,
        top_n=10,
        _env_file=None,
    )
    try:
        with open_database(settings) as db:
            db.upgrade()
        build_random_bundle(settings.bundles_dir, users=1000, playlists=1000, candidates=125)
        clock = time.perf_counter()
        run_full(settings, kind="scheduled", prepare=night_preparation(settings))
        night0_seconds = time.perf_counter() - clock
        base = promoted_bundle(settings.bundles_dir)

        rows = pd.read_parquet(data, columns=["user_id", "playlist_id", "weight"])
        _new_partition(rows, args, source / "night-1.parquet")
        del rows
        clock = time.perf_counter()
        night1 = run_full(settings, kind="scheduled", prepare=night_preparation(settings))
        night1_seconds = time.perf_counter() - clock
        incremental = night1.phases.get("refresh_incremental")

        # The baseline: the same data refreshed in full from the same base.
        result = ingest(source, settings.ingest_dir)
        with open_database(settings) as db:
            users, items = liked_pairs(db)
        latest = with_likes(result.interactions, users, items, settings.like_weight)
        clock = time.perf_counter()
        refresh_bundle(latest, settings.bundles_dir, base, promote_bundle=False)
        full_seconds = time.perf_counter() - clock
        print(
            json.dumps(
                {
                    "users": args.users,
                    "playlists": playlists,
                    "new_share": args.new_share,
                    "night0_full_pipeline_seconds": round(night0_seconds, 1),
                    "night1_pipeline_seconds": round(night1_seconds, 1),
                    "night1_phases": night1.phases,
                    "night1_users": night1.users_total,
                    "incremental_refresh_seconds": incremental,
                    "full_refresh_seconds": round(full_seconds, 1),
                    "full_over_incremental": round(full_seconds / incremental, 2)
                    if incremental
                    else None,
                }
            )
        )
    finally:
        _drop_keys(args.redis_url, prefix)
        shutil.rmtree(home, ignore_errors=True)


def _new_partition(rows: pd.DataFrame, args, path: Path) -> None:
    """``new_share`` of the rows again as new interactions: existing users with playlists they
    have not had, and a few new users copying part of an existing user's history."""
    rng = np.random.default_rng(args.seed + 1)
    count = int(args.new_share * len(rows))
    users = rows["user_id"].to_numpy()
    fresh = pd.DataFrame(
        {
            "user_id": rng.choice(users, count),
            "playlist_id": rng.choice(rows["playlist_id"].to_numpy(), count),
            "weight": np.ones(count, dtype=np.float32),
        }
    )
    known = np.unique(users)
    newcomers = max(1, int(args.new_users * len(known)))
    models = rng.choice(known, newcomers, replace=False)
    copied = rows[rows["user_id"].isin(models)].copy()
    copied["user_id"] = copied["user_id"].map(
        dict(
            zip(
                models.tolist(),
                (int(known.max()) + 1 + np.arange(newcomers)).tolist(),
                strict=True,
            )
        )
    )
    pd.concat([fresh, copied], ignore_index=True).to_parquet(path, index=False)


def _same_fs(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def _drop_keys(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{prefix}*", count=10_000):
        client.unlink(key)


if __name__ == "__main__":
    main()
