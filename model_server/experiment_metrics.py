"""The running experiment's report on /metrics, recomputed in the background.

Grafana then shows the numbers `encore experiments report` prints: they come from the same
function over the same rows, not from a second formula over counters.
"""

from __future__ import annotations

import asyncio
import logging

from encore.database import AsyncDatabase
from encore.errors import StoreUnavailable
from encore.experiment_report import report
from model_server import api_metrics as metrics

logger = logging.getLogger("encore.api.experiments")


async def refresh(database: AsyncDatabase) -> None:
    experiment = await database.get_experiment()
    if experiment is None:
        metrics.record_experiment(None)
        return
    counts = await database.experiment_counts(experiment.experiment_id)
    metrics.record_experiment(report(experiment, counts))


async def refresh_forever(database: AsyncDatabase, *, interval_seconds: float) -> None:
    failing = False
    while True:
        # Not at once: with a query while the Postgres pool was still opening, a later
        # Postgres restart left the pool unable to hand out a connection within its timeout
        # (tests/test_faults_postgres.py). GET /v1/experiments/current also sets the gauges.
        await asyncio.sleep(interval_seconds)
        try:
            await refresh(database)
            failing = False
        except StoreUnavailable as exc:
            # The gauges keep their last values; feedback answers 503 meanwhile anyway.
            if not failing:
                logger.warning("cannot refresh the experiment's gauges: %s", exc)
            failing = True
