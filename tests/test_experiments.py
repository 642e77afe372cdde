"""Experiments, without a run: which arm a user is in, the statistics of the verdict (checked
against scipy), and the counts the database gives the report (on SQLite and a real Postgres)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import numpy as np
import pytest
from scipy import stats

from encore.database import FeedbackEvent, open_database
from encore.errors import ExperimentError
from encore.experiment_report import compare, report, wilson
from encore.experiments import (
    Assignment,
    Challenger,
    Experiment,
    VersionCounts,
    challenger_mask,
    new_experiment_id,
)
from encore.settings import Settings

USERS = np.arange(100_000, dtype=np.int64) * 7 + 11  # ids as a real catalogue spreads them


@pytest.mark.parametrize("share", [0.01, 0.1, 0.5, 0.9])
def test_the_challenger_gets_its_share_within_one_percent(share: float) -> None:
    mask = challenger_mask(Challenger("exp-a", "v2", share), USERS)
    assert abs(mask.mean() - share) <= 0.01


def test_an_arm_is_a_function_of_the_experiment_and_the_user() -> None:
    arm = Challenger("exp-a", "v2", 0.3)
    first = challenger_mask(arm, USERS)
    # The same every night (a new process, a new order), and the same in plain Python (the
    # API) as in numpy (the run).
    assert (challenger_mask(arm, USERS[::-1])[::-1] == first).all()
    python = Assignment(arm)
    assert [python.is_challenger(int(u)) for u in USERS[:20_000]] == first[:20_000].tolist()
    # A larger share only adds users: nobody leaves the challenger when it is given more.
    wider = challenger_mask(Challenger("exp-a", "v2", 0.5), USERS)
    assert (wider[first]).all()
    # Another experiment draws afresh: its arm is independent of this one's.
    other = challenger_mask(Challenger("exp-b", "v2", 0.3), USERS)
    assert abs((first & other).mean() - 0.3 * 0.3) < 0.01


@pytest.mark.parametrize(
    ("liked", "viewed"), [(0, 12), (1, 10), (37, 95), (500, 5000), (5000, 5000)]
)
def test_the_intervals_and_the_p_value_are_scipys(liked: int, viewed: int) -> None:
    rate = wilson(liked, viewed)
    expected = stats.binomtest(liked, viewed).proportion_ci(0.95, method="wilson")
    assert rate.low == pytest.approx(expected.low, abs=1e-12)
    assert rate.high == pytest.approx(expected.high, abs=1e-12)
    other = wilson(viewed // 3, viewed)
    table = [[liked, viewed - liked], [viewed // 3, viewed - viewed // 3]]
    difference = compare(other, rate)
    if liked + viewed // 3 in (0, 2 * viewed):  # a degenerate table: no test to run
        assert difference.p_value == 1.0
    else:
        chi2 = stats.chi2_contingency(table, correction=False)
        assert difference.p_value == pytest.approx(chi2.pvalue, rel=1e-9)


def _stream(rng: np.random.Generator, users: int, rate: float, version: str) -> VersionCounts:
    """Each user is shown 1 to 3 lists and likes with probability ``rate`` (per user)."""
    views = rng.integers(1, 4, size=users)
    liked = rng.random(users) < rate
    likes = np.where(liked, rng.integers(1, 3, size=users), 0)
    return VersionCounts(version, users, int(liked.sum()), int(views.sum()), int(likes.sum()))


def _experiment() -> Experiment:
    return Experiment("exp-s", "v1", "v2", 0.5, offline={"v1": {"recall@10": 0.2}})


def test_a_better_challenger_is_reported_better() -> None:
    rng = np.random.default_rng(0)
    counts = [_stream(rng, 4000, 0.20, "v1"), _stream(rng, 4000, 0.25, "v2")]
    result = report(_experiment(), counts)
    difference = result["difference"]
    assert difference["low"] > 0 and difference["p_value"] < 0.001
    assert difference["low"] < 0.05 < difference["high"]  # the true difference is inside
    assert result["verdict"] == "the challenger is better"
    champion, challenger = result["versions"]
    assert (champion["role"], challenger["role"]) == ("champion", "challenger")
    assert champion["like_rate_low"] < 0.20 < champion["like_rate_high"]
    assert champion["offline"] == {"recall@10": 0.2, "ndcg@10": None}


def test_equal_rates_give_an_interval_that_holds_zero() -> None:
    rng = np.random.default_rng(1)
    counts = [_stream(rng, 4000, 0.20, "v1"), _stream(rng, 4000, 0.20, "v2")]
    result = report(_experiment(), counts)
    assert result["difference"]["low"] < 0 < result["difference"]["high"]
    assert result["difference"]["p_value"] > 0.05
    assert result["verdict"] == "no significant difference yet"


def test_without_views_there_is_no_verdict() -> None:
    result = report(_experiment(), [VersionCounts("v1", 10, 2, 10, 2)])
    assert result["difference"] is None and result["verdict"].startswith("not enough data")
    assert result["versions"][1]["like_rate"] is None


def _event(user_id: int, version: str, kind: str, experiment_id: str | None) -> FeedbackEvent:
    return FeedbackEvent(
        event_id=uuid.uuid4(),
        user_id=user_id,
        run_id="r1",
        liked_playlist_id=5 if kind == "like" else None,
        shown_playlist_ids=[5, 6],
        model_version=version,
        kind=kind,
        experiment_id=experiment_id,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request: pytest.FixtureRequest, tmp_path) -> Settings:
    url = request.getfixturevalue("database_url") if request.param == "postgres" else None
    settings = Settings(home=tmp_path, database_url=url, _env_file=None)
    with open_database(settings) as db:
        db.upgrade()
    return settings


async def _insert(settings: Settings, events: list[FeedbackEvent]) -> None:
    from encore.database import open_async_database

    database = open_async_database(settings)
    await database.open()
    try:
        for event in events:
            assert await database.insert_feedback(event)
    finally:
        await database.aclose()


def test_the_database_counts_users_views_and_likes_per_version(settings: Settings) -> None:
    import asyncio

    experiment = Experiment(
        new_experiment_id(), "v1", "v2", 0.5, started_at=datetime.now(UTC), offline={}
    )
    events = [
        _event(1, "v1", "view", experiment.experiment_id),
        _event(1, "v1", "view", experiment.experiment_id),
        _event(1, "v1", "like", experiment.experiment_id),
        _event(1, "v1", "like", experiment.experiment_id),
        _event(2, "v1", "view", experiment.experiment_id),
        _event(3, "v2", "view", experiment.experiment_id),
        _event(3, "v2", "like", experiment.experiment_id),
        _event(4, "v2", "like", experiment.experiment_id),  # a like without a view: no trial
        _event(5, "v1", "view", None),  # outside the experiment
        _event(6, "v1", "view", "another"),
    ]
    asyncio.run(_insert(settings, events))
    with open_database(settings) as db:
        db.start_experiment(experiment)
        with pytest.raises(ExperimentError, match="is running: end it first"):
            db.start_experiment(Experiment(new_experiment_id(), "v1", "v3", 0.1))
        counts = db.experiment_counts(experiment.experiment_id)
        assert counts == [
            VersionCounts("v1", users_viewed=2, users_liked=1, views=3, likes=2),
            VersionCounts("v2", users_viewed=1, users_liked=1, views=1, likes=2),
        ]
        assert db.get_experiment().experiment_id == experiment.experiment_id
        ended = db.end_experiment("stopped")
        assert ended.end_reason == "stopped" and ended.ended_at is not None
        assert db.get_experiment() is None and db.end_experiment("stopped") is None
        assert db.last_experiment().experiment_id == experiment.experiment_id
        # Ended, the next one may start.
        db.start_experiment(Experiment(new_experiment_id(), "v1", "v3", 0.1))
