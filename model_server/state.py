"""What the API holds for its lifetime: the stores, and its view of the current run."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from encore.database import AsyncDatabase
from encore.errors import NoPublishedRun, StoreUnavailable
from encore.online import AsyncOnlineReader, RunInfo
from encore.settings import Settings
from model_server import api_metrics as metrics

logger = logging.getLogger("encore.api")


@dataclass
class ServingState:
    settings: Settings
    reader: AsyncOnlineReader
    database: AsyncDatabase
    _run: RunInfo | None = None
    _checked_at: float = float("-inf")
    _refresh: asyncio.Task | None = None
    _stale_since: float | None = None  # monotonic time of the first failed refresh in a row

    async def current_run(self) -> RunInfo:
        """The published run, re-read at most every ``run_cache_seconds``.

        A flip becomes visible within that time; the replaced run stays readable for its
        grace period, so requests in between are still answered from a complete run.

        One read at a time (single flight): the request that finds the view stale reads
        the store; requests arriving meanwhile use the run already known, or wait for that
        read when none is. When the read fails and a run is known, that run is served
        (logged, and counted in ``encore_run_refresh_failures_total``): the lists are read
        from the store anyway, so a store that is really down still answers 503 there.
        """
        if time.monotonic() - self._checked_at >= self.settings.run_cache_seconds:
            if self._refresh is None:
                self._refresh = asyncio.get_running_loop().create_task(self._reread())
                self._refresh.add_done_callback(self._refreshed)
                await asyncio.shield(self._refresh)
            elif self._run is None:
                await asyncio.shield(self._refresh)
        if self._run is None:
            raise NoPublishedRun("no run has been published yet: run `encore run`")
        return self._run

    async def _reread(self) -> None:
        try:
            with metrics.STORE_READ_SECONDS.labels("current_run").time():
                run = await self.reader.current()
        except StoreUnavailable as exc:
            if self._run is None:
                raise  # nothing to fall back on: the waiting requests answer 503
            metrics.RUN_REFRESH_FAILURES.inc()
            if self._stale_since is None:
                self._stale_since = time.monotonic()
                logger.warning(
                    "cannot read the current run (%s); serving the last known run %s",
                    exc,
                    self._run.run_id,
                )
            # Tried again after run_cache_seconds, not by every request meanwhile.
            self._checked_at = time.monotonic()
            return
        if self._stale_since is not None:
            logger.info(
                "the current run is readable again after %.1f s",
                time.monotonic() - self._stale_since,
            )
            self._stale_since = None
        self._checked_at = time.monotonic()
        if run is not None and (self._run is None or run.run_id != self._run.run_id):
            logger.info("serving run %s (model %s)", run.run_id, run.model_version)
            metrics.SERVING_RUN.info({"run_id": run.run_id, "model_version": run.model_version})
            published = run.published_at or run.created_at
            metrics.CURRENT_RUN_AGE.set_function(lambda: time.time() - published)
        self._run = run

    def _refreshed(self, task: asyncio.Task) -> None:
        self._refresh = None
        if not task.cancelled():
            task.exception()  # retrieved: its waiters got it; none may be left to await it
