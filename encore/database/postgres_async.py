"""Postgres backend of feedback and run records for the API (psycopg's async pool)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from encore.database import experiment_sql
from encore.database.base import AsyncDatabase, FeedbackConflict, FeedbackEvent, RunRecord
from encore.database.postgres import (
    INSERT_FEEDBACK,
    INSERT_REQUEST,
    SELECT_FEEDBACK,
    insert_run_sql,
    run_from_row,
    run_values,
)
from encore.errors import DATABASE, StoreUnavailable
from encore.experiments import Experiment, VersionCounts
from encore.redact import redact

logger = logging.getLogger("encore.database.postgres")


class AsyncPostgresDatabase(AsyncDatabase):
    """The API's side: a pool that neither needs Postgres to start nor outlives a restart.

    The pool opens without waiting and keeps connecting in the background (psycopg_pool's
    reconnection with backoff), so the API serves recommendations while Postgres is down
    and feedback answers 503 until it is back. Every connection is checked before it is
    handed out, so the connections a Postgres restart killed are replaced, not used.
    """

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 2,
        max_size: int = 10,
        timeout_seconds: float = 3.0,
        connect_timeout_seconds: int = 5,
        reconnect_timeout_seconds: float = 5.0,
    ) -> None:
        self.url = url
        self.pool = AsyncConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            # How long a request waits for a connection; while Postgres is down, the time a
            # feedback request takes to be told 503.
            timeout=timeout_seconds,
            # The pool retries a failed connection with a doubling delay (1, 2, 4, 8... s)
            # for this long, then gives up until a request needs a connection, which starts
            # a new series at once. Short: after a long outage the next attempt is never
            # more than a few seconds away, rather than minutes.
            reconnect_timeout=reconnect_timeout_seconds,
            kwargs={
                "row_factory": dict_row,
                "autocommit": True,
                "connect_timeout": connect_timeout_seconds,
            },
            check=AsyncConnectionPool.check_connection,
            open=False,
            name="encore-api",
        )

    async def open(self) -> None:
        await self.pool.open(wait=False)

    def _unavailable(self, exc: Exception) -> StoreUnavailable:
        # Every psycopg error, not only OperationalError: a read-only standby (25006), a
        # full disk, a missing migration are all "the database cannot take this now".
        return StoreUnavailable(
            f"Postgres at {redact(self.url)} is unavailable: {type(exc).__name__}: {exc}",
            component=DATABASE,
        )

    async def _fetch(
        self,
        sql: str,
        params: Any = None,
        *,
        one: bool = False,
        timeout_seconds: float | None = None,
    ):
        # The pool's check runs just before a connection is handed out, but a server can
        # still end the session between that check and the statement (a restart's SIGTERM
        # lands asynchronously). A statement that failed because its connection broke is run
        # again on another connection: every statement here is a read or an insert that is
        # idempotent by its key, so a second run never stores anything twice. A broken
        # connection leaves the pool, so a restart that killed them all costs at most one
        # attempt per pooled connection.
        attempts = self.pool.max_size + 1
        for attempt in range(1, attempts + 1):
            used: psycopg.AsyncConnection | None = None
            try:
                async with self.pool.connection(timeout=timeout_seconds) as conn:
                    used = conn
                    cursor = await conn.execute(sql, params)
                    if cursor.description is None:
                        return None
                    return await (cursor.fetchone() if one else cursor.fetchall())
            except psycopg.OperationalError as exc:
                if attempt < attempts and used is not None and used.broken:
                    logger.warning("a pooled Postgres connection broke (%s); retrying", exc)
                    continue
                raise self._unavailable(exc) from exc
            except psycopg.Error as exc:  # PoolTimeout is one
                raise self._unavailable(exc) from exc
        raise AssertionError("unreachable")

    async def insert_feedback(self, event: FeedbackEvent) -> bool:
        row = await self._fetch(
            INSERT_FEEDBACK,
            (
                event.event_id,
                event.user_id,
                event.run_id,
                event.model_version,
                event.liked_playlist_id,
                list(event.shown_playlist_ids),
                event.kind,
                event.experiment_id,
            ),
            one=True,
        )
        if row is not None:
            return True
        stored = await self._fetch(
            f"{SELECT_FEEDBACK} WHERE event_id = %s", (event.event_id,), one=True
        )
        if stored is not None and not event.same_event(FeedbackEvent(**stored)):
            raise FeedbackConflict(str(event.event_id))
        return False

    async def enqueue_run(self, record: RunRecord, user_ids: Sequence[int] | None = None) -> None:
        values = run_values(record)
        try:
            async with self.pool.connection() as conn, conn.transaction():
                await conn.execute(insert_run_sql(values), values)
                if user_ids is not None:
                    await conn.execute(INSERT_REQUEST, (record.run_id, list(user_ids)))
        except psycopg.Error as exc:
            raise self._unavailable(exc) from exc

    async def get_run(self, run_id: str) -> RunRecord | None:
        row = await self._fetch("SELECT * FROM runs WHERE run_id = %s", (run_id,), one=True)
        return run_from_row(row) if row else None

    async def list_runs(self, *, limit: int = 50) -> list[RunRecord]:
        rows = await self._fetch("SELECT * FROM runs ORDER BY created_at DESC LIMIT %s", (limit,))
        return [run_from_row(r) for r in rows]

    async def get_experiment(self, experiment_id: str | None = None) -> Experiment | None:
        statement, params = (
            (experiment_sql.CURRENT, ())
            if experiment_id is None
            else (experiment_sql.BY_ID, (experiment_id,))
        )
        row = await self._fetch(experiment_sql.sql(statement, "postgres"), params, one=True)
        return experiment_sql.experiment_from_row(row) if row else None

    async def experiment_counts(self, experiment_id: str) -> list[VersionCounts]:
        rows = await self._fetch(
            experiment_sql.sql(experiment_sql.COUNTS, "postgres"), (experiment_id,)
        )
        return experiment_sql.counts_from_rows(rows)

    async def ping(self, *, timeout_seconds: float | None = None) -> None:
        await self._fetch("SELECT 1", timeout_seconds=timeout_seconds)

    async def aclose(self) -> None:
        await self.pool.close()
