"""`encore demo --nights N`: nights simulated one after the other, each with new users, likes
from the page and (on the second night) a shift of taste, run through the nightly pipeline."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import orjson
import pandas as pd

from encore.console import console, stage_progress
from encore.settings import Settings

NEW_USER_SHARE = 0.05  # of the first day's users, joining each night
LIKERS = 200  # users who like the first playlist of their list each night
SHIFT_NIGHT = 2  # the night a share of the users turns to playlists they ignored
SHIFT_USER_SHARE = 0.3
SHIFT_PLAYLIST_SHARE = 0.05
SAMPLE = 2000  # users whose lists are compared from one night to the next
# Users who join on night 1 with one play of a playlist nobody else has: no neighbour, no
# item-model pick, so cold; their history arrives over the following nights.
COLD_SHARE = 0.02


@dataclass(frozen=True)
class NightLine:
    night: int
    run_id: str
    model_version: str
    users: int
    cold: int
    drift: float | None
    overlap: float | None  # mean share of a sampled user's top-10 kept from the night before
    phases: dict[str, float]


def simulate_nights(
    settings: Settings, first_day: pd.DataFrame, nights: int, *, seed: int = 0
) -> None:
    """Turn ``first_day`` (user_id, playlist_id, weight: the data the promoted model was
    trained on) into the first partition of a growing source, then simulate ``nights`` nights
    through the nightly pipeline."""
    from encore.cli.ingest import night_preparation
    from scheduler.job import run_full

    source = settings.home / "demo-nights"
    # A new simulation: the partitions and what the ingest read of them start again.
    shutil.rmtree(source, ignore_errors=True)
    shutil.rmtree(settings.ingest_dir, ignore_errors=True)
    source.mkdir(parents=True)
    base = first_day[["user_id", "playlist_id", "weight"]]
    base.to_parquet(source / "night-0.parquet", index=False)
    settings = settings.model_copy(update={"interactions": source})
    rng = np.random.default_rng(seed)
    users = np.unique(base["user_id"].to_numpy())
    playlists = np.unique(base["playlist_id"].to_numpy())
    rising = rng.choice(
        playlists[np.argsort(base["playlist_id"].value_counts().reindex(playlists).to_numpy())][
            : len(playlists) // 2
        ],
        max(1, int(SHIFT_PLAYLIST_SHARE * len(playlists))),
        replace=False,
    )
    sample = np.sort(rng.choice(users, min(SAMPLE, len(users)), replace=False))
    before = None
    cohort = int(users.max()) + 1_000_000 + np.arange(max(2, int(COLD_SHARE * len(users))))
    console.print(
        f"simulating {nights} nights: {int(NEW_USER_SHARE * len(users)):,} new users a night, "
        f"{LIKERS} likes a night, a shift of taste on night {SHIFT_NIGHT}, and {len(cohort):,} "
        "users joining on night 1 with one play each, whose history comes over the next nights"
    )
    for night in range(1, nights + 1):
        day = pd.concat(
            [
                _new_users(base, users, night, rng),
                _cold_cohort(base, users, playlists, cohort, night, nights, rng),
            ],
            ignore_index=True,
        )
        if night == SHIFT_NIGHT:
            day = pd.concat([day, _shift(users, rising, rng)], ignore_index=True)
        day.to_parquet(source / f"night-{night}.parquet", index=False)
        with stage_progress() as progress:
            record = run_full(
                settings,
                kind="scheduled",
                progress=progress,
                prepare=night_preparation(settings),
            )
        lists = _lists(settings, record.run_id, sample)
        overlap = None if before is None else _overlap(before, lists)
        before = lists
        _print(
            NightLine(
                night,
                record.run_id,
                record.model_version,
                record.users_total,
                record.cold_users,
                record.drift_score,
                overlap,
                record.phases or {},
            )
        )
        _like_first_playlists(settings, record.run_id, rng)


def _overlap(before: list, after: list) -> float:
    shares = [
        len(set(a[:10]) & set(b[:10])) / max(1, min(10, len(a)))
        for a, b in zip(before, after, strict=True)
        if a and b
    ]
    return float(np.mean(shares)) if shares else 0.0


def _new_users(base: pd.DataFrame, users: np.ndarray, night: int, rng) -> pd.DataFrame:
    """New users who each copy a slice of an existing user's history (a taste they share)."""
    count = max(1, int(NEW_USER_SHARE * len(users)))
    first_id = int(users.max()) + 1 + (night - 1) * count
    models = rng.choice(users, count, replace=False)
    history = base[base["user_id"].isin(models)]
    new_id = dict(zip(models.tolist(), range(first_id, first_id + count), strict=True))
    keep = rng.random(len(history)) < 0.7
    day = history[keep].copy()
    day["user_id"] = day["user_id"].map(new_id)
    return day


def _cold_cohort(
    base: pd.DataFrame,
    users: np.ndarray,
    playlists: np.ndarray,
    cohort: np.ndarray,
    night: int,
    nights: int,
    rng,
) -> pd.DataFrame:
    """Night 1: each of ``cohort`` plays one playlist of its own (cold). Later nights: a share
    of them gets a history (a slice of an existing user's), the last of them by the last night."""
    if night == 1:
        return pd.DataFrame(
            {
                "user_id": cohort,
                "playlist_id": int(playlists.max()) + 1 + np.arange(len(cohort)),
                "weight": np.ones(len(cohort), dtype=np.float32),
            }
        )
    parts = np.array_split(cohort, max(1, nights - 1))
    joining = parts[night - 2]
    models = rng.choice(users, len(joining), replace=False)
    history = base[base["user_id"].isin(models)]
    history = history[rng.random(len(history)) < 0.7].copy()
    history["user_id"] = history["user_id"].map(
        dict(zip(models.tolist(), joining.tolist(), strict=True))
    )
    return history


def _shift(users: np.ndarray, rising: np.ndarray, rng) -> pd.DataFrame:
    """A share of the users listening to a few playlists they and their like had ignored."""
    shifted = rng.choice(users, int(SHIFT_USER_SHARE * len(users)), replace=False)
    return pd.DataFrame(
        {
            "user_id": np.repeat(shifted, 3),
            "playlist_id": rng.choice(rising, 3 * len(shifted)),
            "weight": np.full(3 * len(shifted), 5.0, dtype=np.float32),
        }
    ).drop_duplicates(["user_id", "playlist_id"])


def _lists(settings: Settings, run_id: str, users: np.ndarray) -> list[list[int] | None]:
    from encore.online import open_online_store

    with open_online_store(settings) as store:
        return [None if raw is None else orjson.loads(raw) for raw in store.read(run_id, users)]


def _like_first_playlists(settings: Settings, run_id: str, rng) -> None:
    """LIKERS users like the first playlist of their list, as the page records a like."""
    from encore.bundle import promoted_bundle
    from encore.database import FeedbackEvent, open_async_database

    ids = promoted_bundle(settings.bundles_dir).user_ids()
    likers = rng.choice(ids, min(LIKERS, len(ids)), replace=False)
    lists = _lists(settings, run_id, likers)
    events = [
        FeedbackEvent(
            uuid.uuid4(), int(u), run_id, shown[0], shown[:10], created_at=datetime.now(UTC)
        )
        for u, shown in zip(likers, lists, strict=True)
        if shown
    ]

    async def insert() -> None:
        database = open_async_database(settings)
        await database.open()
        try:
            for event in events:
                await database.insert_feedback(event)
        finally:
            await database.aclose()

    asyncio.run(insert())


def _print(line: NightLine) -> None:
    drift = "-" if line.drift is None else f"{line.drift:.3f}"
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in line.phases.items())
    kept = "" if line.overlap is None else f", {line.overlap:.0%} of top-10s kept"
    console.print(
        f"night {line.night}: run {line.run_id}, model {line.model_version}: "
        f"{line.users:,} users, {line.cold:,} cold, drift {drift}{kept} ({phases})",
        highlight=False,
    )
