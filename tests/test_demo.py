"""`encore demo`'s preparation: generated data, a trained model, a published run."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from encore import metric_names as names
from encore.cli.demo import prepare
from encore.settings import get_settings
from scheduler.cron import metrics_registry


def test_the_demos_run_is_counted_in_the_metrics_it_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENCORE_WORKERS", "1")
    get_settings.cache_clear()
    settings = get_settings()
    metrics = metrics_registry(settings)
    prepare(
        settings,
        interactions=None,
        catalog=None,
        columns=None,
        sep=None,
        users=400,
        playlists=80,
        fresh=True,
        run_evaluation=False,
        metrics=metrics,
    )
    sample = metrics.registry.get_sample_value
    assert sample(names.RUNS, {"kind": "manual", "status": "published"}) == 1
    assert sample(f"{names.BATCH_SECONDS}_count") >= 1
    assert sample(f"{names.POPULARITY_DECILE}_count") > 0


def test_the_demos_nights_grow_the_users_and_use_the_likes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from encore.bundle import promoted_bundle
    from encore.cli.demo_nights import simulate_nights
    from encore.database import open_database

    monkeypatch.setenv("ENCORE_WORKERS", "1")
    get_settings.cache_clear()
    settings = get_settings()
    prepare(
        settings,
        interactions=None,
        catalog=None,
        columns=None,
        sep=None,
        users=600,
        playlists=120,
        fresh=True,
        run_evaluation=False,
    )
    trained = promoted_bundle(settings.bundles_dir)
    import pandas as pd

    first_day = pd.read_parquet(settings.home / "demo-data" / "interactions.parquet")
    simulate_nights(settings, first_day, 2)
    with open_database(settings) as db:
        runs = [r for r in db.list_runs() if r.kind == "scheduled"]
        likes = sum(len(chunk) for chunk in db.feedback_since(datetime(1970, 1, 1, tzinfo=UTC)))
    assert len(runs) == 2 and all(r.status in ("published", "superseded") for r in runs)
    runs.sort(key=lambda r: r.run_id)
    users = [r.users_total for r in runs]
    base = len(trained.user_ids())
    # 30 new users a night (a few may copy an empty slice), and 12 who join cold on night 1.
    assert base + 32 <= users[0] <= base + 42 and users[0] + 20 <= users[1] <= users[0] + 30
    # The cold ones get their history on night 2 (of 2): cold users fall.
    assert runs[0].cold_users >= 12 and runs[1].cold_users < runs[0].cold_users
    assert all("refresh" in r.phases for r in runs)
    refreshed = promoted_bundle(settings.bundles_dir)
    assert refreshed.metadata["refreshed_from"] == trained.version
    assert likes > 0  # the first night's lists were liked, the second night learnt from them
