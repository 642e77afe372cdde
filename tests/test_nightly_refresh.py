"""Nightly means fresh: three nights of partitions through the scheduler's job.

New users get personal lists the night after they appear, a like changes the liking user's
candidates, and a bad partition is set aside while the night still publishes.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from encore.bundle import promoted_bundle
from encore.cli.ingest import night_preparation
from encore.database import FeedbackEvent, open_async_database, open_database
from encore.online import open_online_store
from encore.settings import Settings
from scheduler.cron import Jobs, metrics_registry
from training.fit import TrainParams
from training.ingest import read_interactions
from training.pairing import Pairings
from training.source import source_state
from training.synthetic import SyntheticSpec, generate
from training.train import train_bundle

NEW_FROM = 1200  # users with codes from here on join on the second day


@pytest.fixture
def world(tmp_path: Path) -> tuple[Settings, pd.DataFrame]:
    data = generate(SyntheticSpec(users=1500, playlists=300, seed=5), tmp_path / "data")
    rows = pd.read_parquet(data.interactions)
    users = np.sort(rows["user_id"].unique())
    rows["day"] = np.where(rows["user_id"].isin(users[NEW_FROM:]), 2, 1)
    source = tmp_path / "interactions"
    source.mkdir()
    settings = Settings(
        home=tmp_path / "home", interactions=source, workers=1, like_weight=5.0, _env_file=None
    )
    with open_database(settings) as db:
        db.upgrade()
    return settings, rows


def _write_day(settings: Settings, rows: pd.DataFrame, day: int) -> Path:
    path = settings.interactions / f"day-{day}.csv"
    rows[rows["day"] == day][["user_id", "playlist_id", "weight"]].to_csv(path, index=False)
    return path


def _night(settings: Settings):
    metrics = metrics_registry(settings)
    Jobs(settings, metrics, prepare=night_preparation(settings)).nightly()
    with open_database(settings) as db:
        record = db.last_published()
    assert record is not None and record.status == "published"
    return record, {
        (family.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for sample in family.samples
    }


def _lists(settings: Settings, run_id: str, users: np.ndarray) -> list[list[int] | None]:
    with open_online_store(settings) as store:
        return [None if raw is None else orjson.loads(raw) for raw in store.read(run_id, users)]


def _candidates(user_id: int, settings: Settings) -> set[int]:
    bundle = promoted_bundle(settings.bundles_dir)
    pairs = Pairings.load(bundle.pairings_dir)
    code = int(bundle.user_codes(np.array([user_id]))[0])
    items = pairs.items[pairs.indptr[code] : pairs.indptr[code + 1]]
    return set(bundle.playlist_ids()[items].tolist())


def _like(settings: Settings, user_id: int, playlist_id: int, run_id: str) -> None:
    async def insert() -> None:
        database = open_async_database(settings)
        await database.open()
        try:
            event = FeedbackEvent(
                uuid.uuid4(),
                user_id,
                run_id,
                playlist_id,
                [playlist_id],
                created_at=datetime.now(UTC),
            )
            assert await database.insert_feedback(event)
        finally:
            await database.aclose()

    asyncio.run(insert())


def test_three_nights_new_users_likes_and_a_bad_partition(world) -> None:
    settings, rows = world
    first_day = _write_day(settings, rows, 1)
    trained, _ = train_bundle(
        read_interactions(first_day),
        settings.bundles_dir,
        TrainParams(dim=16, epochs=3),
        run_evaluation=False,
    )
    newcomers = np.sort(rows.loc[rows["day"] == 2, "user_id"].unique())

    night1, _ = _night(settings)
    assert night1.model_version == trained.version  # nothing new since training
    assert set(night1.phases) == {"ingest", "score", "publish"}
    assert _lists(settings, night1.run_id, newcomers[:50]) == [None] * 50  # unknown: fallback

    # Day 2: new users arrive, and a partition with a bad row.
    _write_day(settings, rows, 2)
    bad = settings.interactions / "day-2b.csv"
    bad.write_text("user_id,playlist_id,weight\n1,2,1\n3,4,-1\n")
    night2, metrics = _night(settings)
    assert night2.model_version != trained.version
    assert set(night2.phases) == {"ingest", "refresh", "score", "publish"}
    refreshed = promoted_bundle(settings.bundles_dir)
    assert refreshed.metadata["refreshed_from"] == trained.version
    assert night2.users_total == len(rows["user_id"].unique())
    personal = _lists(settings, night2.run_id, newcomers)
    assert sum(lst is not None for lst in personal) >= 0.9 * len(newcomers)
    aside = source_state(settings.ingest_dir).set_aside()
    assert list(aside) == ["day-2b.csv"]
    assert str(bad) in aside["day-2b.csv"] and "line 3" in aside["day-2b.csv"]
    assert "'weight'" in aside["day-2b.csv"]
    assert metrics[("encore_ingest_partitions_set_aside", ())] == 1
    assert metrics[("encore_run_phase_seconds", (("phase", "refresh"),))] > 0

    # Day 3: a user likes the first playlist of their list on the page.
    user = int(newcomers[0])
    shown = _lists(settings, night2.run_id, np.array([user]))[0]
    liked = shown[0]
    before = _candidates(user, settings)
    assert liked in before
    _like(settings, user, liked, night2.run_id)
    others = [int(u) for u in newcomers[1:40]]
    others_before = {u: _candidates(u, settings) for u in others}
    night3, _ = _night(settings)
    assert night3.model_version != night2.model_version
    # One user changed: only they are paired again (an incremental refresh).
    assert "refresh_incremental" in night3.phases
    assert promoted_bundle(settings.bundles_dir).metadata["training"]["users_paired"] == 1
    after = _candidates(user, settings)
    assert liked not in after and after != before  # a seen playlist is no candidate
    assert liked not in _lists(settings, night3.run_id, np.array([user]))[0]
    assert {u: _candidates(u, settings) for u in others} == others_before


def test_a_worse_retrained_ranker_is_refused_by_the_gate(world) -> None:
    from training.retrain import read_gate_result, retrain_with_gate

    settings, rows = world
    trained, _ = train_bundle(
        read_interactions(_write_day(settings, rows, 1)),
        settings.bundles_dir,
        TrainParams(dim=16, epochs=3),
        run_evaluation=False,
    )
    _write_day(settings, rows, 2)
    latest = read_interactions(settings.interactions / "day-2.csv")
    state = settings.home / "state"
    # A crippled challenger: two neighbours, three candidates, no item model, one epoch.
    crippled = TrainParams(
        dim=4, epochs=1, neighbours=2, candidates=3, item_method="none", popularity_penalty=0.0
    )
    result = retrain_with_gate(
        latest, settings.bundles_dir, trained, tolerance=0.02, state_dir=state, params=crippled
    )
    assert result.challenger_recall < result.champion_recall * 0.98
    assert not result.promoted
    assert promoted_bundle(settings.bundles_dir).version == trained.version  # kept, unpromoted
    assert result.challenger.metadata["metrics"]["gate"]["champion"] == trained.version
    assert read_gate_result(state)["promoted"] is False


def test_the_nightly_job_retrains_when_due_and_promotes_what_passes(world) -> None:
    settings, rows = world
    settings = settings.model_copy(update={"retrain_every_days": 1e-9, "retrain_tolerance": 0.9})
    trained, _ = train_bundle(
        read_interactions(_write_day(settings, rows, 1)),
        settings.bundles_dir,
        TrainParams(dim=16, epochs=3, ease_lambda=100.0, popularity_penalty=0.0),
        run_evaluation=False,
    )
    _write_day(settings, rows, 2)
    night, metrics = _night(settings)
    assert set(night.phases) == {"ingest", "retrain", "score", "publish"}
    retrained = promoted_bundle(settings.bundles_dir)
    assert retrained.version == night.model_version != trained.version
    assert "refreshed_from" not in retrained.metadata
    assert retrained.metadata["metrics"]["gate"]["champion"] == trained.version
    assert metrics[("encore_retrain_refused", ())] == 0
    assert metrics[("encore_retrain_recall_at_10", (("role", "challenger"),))] > 0


def test_the_nightly_job_refuses_a_worse_retrained_ranker_and_still_publishes(
    world, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, rows = world
    settings = settings.model_copy(update={"retrain_every_days": 1e-9})
    trained, _ = train_bundle(
        read_interactions(_write_day(settings, rows, 1)),
        settings.bundles_dir,
        TrainParams(dim=16, epochs=3),
        run_evaluation=False,
    )
    # This retraining is crippled: two neighbours, three candidates, no item model, one epoch.
    crippled = TrainParams(
        dim=4, epochs=1, neighbours=2, candidates=3, item_method="none", popularity_penalty=0.0
    )
    monkeypatch.setattr("training.retrain.retrain_params", lambda champion: crippled)
    _write_day(settings, rows, 2)
    night, metrics = _night(settings)
    assert set(night.phases) == {"ingest", "retrain", "refresh", "score", "publish"}
    served = promoted_bundle(settings.bundles_dir)
    assert served.metadata["refreshed_from"] == trained.version  # the champion, refreshed
    assert metrics[("encore_retrain_refused", ())] == 1
    challenger = metrics[("encore_retrain_recall_at_10", (("role", "challenger"),))]
    champion = metrics[("encore_retrain_recall_at_10", (("role", "champion"),))]
    assert challenger < champion * (1 - settings.retrain_tolerance)


def test_a_shift_of_taste_raises_the_drift_between_nights(world) -> None:
    settings, rows = world
    train_bundle(
        read_interactions(_write_day(settings, rows, 1)),
        settings.bundles_dir,
        TrainParams(dim=16, epochs=3),
        run_evaluation=False,
    )
    quiet, _ = _night(settings)
    # A night like the others: a few more listens of what users already like.
    _write_day(settings, rows.sample(frac=0.02, random_state=1).assign(day=3), 3)
    calm, _ = _night(settings)
    # A shift: 40 % of the users turn to ten playlists that were among the least played.
    rng = np.random.default_rng(7)
    users = rng.choice(rows["user_id"].unique(), int(0.4 * rows["user_id"].nunique()), False)
    rare = rows["playlist_id"].value_counts().index[-60:-50].to_numpy()
    shift = pd.DataFrame(
        {
            "user_id": np.repeat(users, 4),
            "playlist_id": rng.choice(rare, 4 * len(users)),
            "weight": 20.0,
            "day": 4,
        }
    ).drop_duplicates(["user_id", "playlist_id"])
    _write_day(settings, shift, 4)
    shifted, _ = _night(settings)
    assert quiet.drift_score is None and calm.drift_score is not None  # no night before
    assert shifted.drift_score > max(0.05, 10 * calm.drift_score)


def test_a_failed_refresh_does_not_cost_the_night(world, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, rows = world
    trained, _ = train_bundle(
        read_interactions(_write_day(settings, rows, 1)),
        settings.bundles_dir,
        TrainParams(dim=16, epochs=3),
        run_evaluation=False,
    )
    _write_day(settings, rows, 2)

    def broken(*args, **kwargs):
        raise MemoryError("the refresh ran out of memory")

    monkeypatch.setattr("training.freshness.refresh_bundle", broken)
    night, _ = _night(settings)
    assert night.model_version == trained.version  # scored as it was
    assert set(night.phases) == {"ingest", "score", "publish"}
