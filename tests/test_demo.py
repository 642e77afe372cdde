"""`encore demo`'s preparation: generated data, a trained model, a published run."""

from __future__ import annotations

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
