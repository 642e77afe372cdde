"""What the API holds for its lifetime: the stores, and its view of the current run."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from encore.database import AsyncDatabase
from encore.errors import NoPublishedRun
from encore.online import AsyncOnlineReader, RunInfo
from encore.settings import Settings
from model_server import metrics

logger = logging.getLogger("encore.api")


@dataclass
class ServingState:
    settings: Settings
    reader: AsyncOnlineReader
    database: AsyncDatabase
    _run: RunInfo | None = None
    _checked_at: float = float("-inf")

    async def current_run(self) -> RunInfo:
        """The published run, re-read at most every ``run_cache_seconds``.

        A flip becomes visible within that time; the replaced run stays readable for its
        grace period, so requests in between are still answered from a complete run.
        """
        now = time.monotonic()
        if now - self._checked_at >= self.settings.run_cache_seconds:
            with metrics.STORE_READ_SECONDS.labels("current_run").time():
                run = await self.reader.current()
            self._checked_at = now
            if run is not None and (self._run is None or run.run_id != self._run.run_id):
                logger.info("serving run %s (model %s)", run.run_id, run.model_version)
                metrics.SERVING_RUN.info({"run_id": run.run_id, "model_version": run.model_version})
                published = run.published_at or run.created_at
                metrics.CURRENT_RUN_AGE.set_function(lambda: time.time() - published)
            self._run = run
        if self._run is None:
            raise NoPublishedRun("no run has been published yet: run `encore run`")
        return self._run
