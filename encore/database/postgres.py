"""Postgres backend (psycopg 3 and psycopg_pool) of run records, feedback and the run lock."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from encore.database import experiment_sql
from encore.database.base import (
    RUN_FIELDS,
    Database,
    FeedbackEvent,
    RunLock,
    RunRecord,
    migrations,
)
from encore.errors import DATABASE, RunLocked, StoreUnavailable
from encore.experiments import Experiment, VersionCounts, experiment_running
from encore.redact import redact

logger = logging.getLogger("encore.database.postgres")

# Any constant works; it names the lock "the nightly run" for every replica.
RUN_LOCK_KEY = 0x656E636F7265  # "encore"
MIGRATION_LOCK_KEY = RUN_LOCK_KEY + 1
UNAVAILABLE = (psycopg.OperationalError, PoolTimeout)

INSERT_FEEDBACK = """
INSERT INTO feedback (event_id, user_id, run_id, model_version, liked_playlist_id,
                      shown_playlist_ids, kind, experiment_id)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""
INSERT_REQUEST = "INSERT INTO run_requests (run_id, user_ids) VALUES (%s, %s)"
SELECT_FEEDBACK = (
    "SELECT event_id, user_id, run_id, liked_playlist_id, shown_playlist_ids, model_version,"
    " created_at, kind, experiment_id FROM feedback"
)
JSON_FIELDS = ("popularity_deciles", "users_by_version", "phases")


def run_from_row(row: dict[str, Any]) -> RunRecord:
    return RunRecord(**{name: row[name] for name in RUN_FIELDS})


def run_values(record: RunRecord) -> dict[str, Any]:
    return _adapt({name: getattr(record, name) for name in RUN_FIELDS})


def insert_run_sql(values: dict[str, Any]) -> str:
    present = [k for k, v in values.items() if v is not None]
    return (
        f"INSERT INTO runs ({', '.join(present)}) "
        f"VALUES ({', '.join('%(' + k + ')s' for k in present)}) ON CONFLICT (run_id) DO NOTHING"
    )


def _update_sql(values: dict[str, Any]) -> str:
    unknown = set(values) - set(RUN_FIELDS)
    if unknown:
        raise ValueError(f"unknown run record fields: {sorted(unknown)}")
    return f"UPDATE runs SET {', '.join(f'{k} = %({k})s' for k in values)} WHERE run_id = %(_id)s"


def _adapt(values: dict[str, Any]) -> dict[str, Any]:
    return {k: Jsonb(v) if k in JSON_FIELDS and v is not None else v for k, v in values.items()}


class PostgresDatabase(Database):
    dialect = "postgres"

    def __init__(self, url: str, *, max_size: int = 4, timeout_seconds: float = 10.0) -> None:
        self.url = url
        self.pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_size,
            timeout=timeout_seconds,
            kwargs={"row_factory": dict_row, "autocommit": True},
            # A connection left from before a Postgres restart is replaced before it is
            # handed out, rather than failing the run's next write.
            check=ConnectionPool.check_connection,
            open=False,
            name="encore-sync",
        )
        try:
            self.pool.open(wait=True, timeout=timeout_seconds)
        except UNAVAILABLE as exc:
            self.pool.close()
            raise unreachable(url, exc) from exc

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection]:
        try:
            with self.pool.connection() as conn:
                yield conn
        except UNAVAILABLE as exc:
            raise unreachable(self.url, exc) from exc

    def upgrade(self) -> list[str]:
        applied: list[str] = []
        with self._conn() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
            try:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
                    " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {r["version"] for r in conn.execute("SELECT version FROM schema_migrations")}
                for number, name, sql in migrations(self.dialect):
                    if number in done:
                        continue
                    with conn.transaction():
                        conn.execute(sql)
                        conn.execute(
                            "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                            (number, name),
                        )
                    applied.append(name)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        return applied

    def create_run(self, record: RunRecord) -> None:
        values = run_values(record)
        with self._conn() as conn:
            conn.execute(insert_run_sql(values), values)

    def save_progress(self, run_id: str, *, users_scored: int, cold_users: int) -> None:
        with self._conn() as conn:
            conn.execute(
                "UPDATE runs SET users_scored = %s, cold_users = %s"
                " WHERE run_id = %s AND status = 'running'",
                (users_scored, cold_users, run_id),
            )

    def update_run(self, run_id: str, **values: Any) -> None:
        with self._conn() as conn:
            conn.execute(_update_sql(values), {**_adapt(values), "_id": run_id})

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM runs WHERE run_id = %s", (run_id,)).fetchone()
        return run_from_row(row) if row else None

    def list_runs(self, *, limit: int = 50) -> list[RunRecord]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT * FROM runs ORDER BY created_at DESC LIMIT %s", (limit,)
            ).fetchall()
        return [run_from_row(r) for r in rows]

    def last_published(self, *, full_only: bool = True) -> RunRecord | None:
        kinds = "AND target_run_id IS NULL" if full_only else ""
        with self._conn() as conn:
            row = conn.execute(
                f"SELECT * FROM runs WHERE status = 'published' {kinds} "
                "ORDER BY finished_at DESC LIMIT 1"
            ).fetchone()
        return run_from_row(row) if row else None

    def enqueue_run(self, record: RunRecord, user_ids: Sequence[int] | None = None) -> None:
        values = run_values(record)
        with self._conn() as conn, conn.transaction():
            conn.execute(insert_run_sql(values), values)
            if user_ids is not None:
                conn.execute(INSERT_REQUEST, (record.run_id, list(user_ids)))

    def claim_run(self, run_id: str, **values: Any) -> bool:
        sql = _update_sql({**values, "status": "running"}) + " AND status = 'queued'"
        with self._conn() as conn:
            cursor = conn.execute(sql, {**_adapt(values), "status": "running", "_id": run_id})
            return cursor.rowcount == 1

    def next_queued(self) -> RunRecord | None:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT * FROM runs WHERE status = 'queued' ORDER BY created_at LIMIT 1"
            ).fetchone()
        return run_from_row(row) if row else None

    def open_runs(self) -> list[RunRecord]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT * FROM runs WHERE status IN ('queued', 'running', 'publishing') "
                "ORDER BY created_at"
            ).fetchall()
        return [run_from_row(r) for r in rows]

    def requested_users(self, run_id: str) -> list[int] | None:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT user_ids FROM run_requests WHERE run_id = %s", (run_id,)
            ).fetchone()
        return list(row["user_ids"]) if row else None

    def record_flip(self, run_id: str, *, served: str, **values: Any) -> None:
        values = {**values, "status": "published"}
        with self._conn() as conn, conn.transaction():
            conn.execute(_update_sql(values), {**_adapt(values), "_id": run_id})
            conn.execute(
                "UPDATE runs SET status = 'published' WHERE run_id = %s AND status = 'superseded'",
                (served,),
            )
            conn.execute(
                "UPDATE runs SET status = 'superseded' WHERE status = 'published'"
                " AND target_run_id IS NULL AND run_id <> %s",
                (served,),
            )

    @contextmanager
    def run_lock(self, owner: str) -> Iterator[RunLock]:
        lock = _AdvisoryLock(self.url, owner)
        lock.acquire()
        try:
            yield lock
        finally:
            lock.release()

    def feedback_since(
        self, since: datetime, *, chunk: int = 10_000
    ) -> Iterator[list[FeedbackEvent]]:
        # A named (server-side) cursor streams the rows instead of loading them all.
        with (
            self._conn() as conn,
            conn.transaction(),
            conn.cursor(name="feedback_export") as cursor,
        ):
            cursor.execute(
                f"{SELECT_FEEDBACK} WHERE created_at >= %s ORDER BY created_at, event_id",
                (since,),
            )
            while rows := cursor.fetchmany(chunk):
                yield [FeedbackEvent(**row) for row in rows]

    def start_experiment(self, experiment: Experiment) -> None:
        try:
            with self._conn() as conn:
                conn.execute(
                    experiment_sql.sql(experiment_sql.INSERT, self.dialect),
                    experiment_sql.insert_values(experiment, self.dialect),
                )
        except psycopg.errors.UniqueViolation as exc:
            raise experiment_running(self.get_experiment()) from exc

    def end_experiment(self, reason: str) -> Experiment | None:
        with self._conn() as conn, conn.transaction():
            row = conn.execute(experiment_sql.CURRENT + " FOR UPDATE").fetchone()
            if row is None:
                return None
            ended = experiment_sql.experiment_from_row(row)
            ended.ended_at, ended.end_reason = datetime.now(UTC), reason
            conn.execute(
                experiment_sql.sql(experiment_sql.END, self.dialect),
                (ended.ended_at, reason, ended.experiment_id),
            )
        return ended

    def get_experiment(self, experiment_id: str | None = None) -> Experiment | None:
        with self._conn() as conn:
            return experiment_sql.fetch_experiment(conn, self.dialect, experiment_id)

    def last_experiment(self) -> Experiment | None:
        with self._conn() as conn:
            return experiment_sql.fetch_one(conn, self.dialect, experiment_sql.LAST, ())

    def experiment_counts(self, experiment_id: str) -> list[VersionCounts]:
        with self._conn() as conn:
            return experiment_sql.fetch_counts(conn, self.dialect, experiment_id)

    def ping(self) -> None:
        with self._conn() as conn:
            conn.execute("SELECT 1")

    def close(self) -> None:
        self.pool.close()


class _AdvisoryLock(RunLock):
    """A session-level advisory lock on a connection of its own: if the process dies,
    Postgres ends the session and frees the lock with it."""

    def __init__(self, url: str, owner: str) -> None:
        self.url = url
        self.owner = owner
        self.conn: psycopg.Connection | None = None

    def acquire(self) -> None:
        try:
            # Keepalives and a TCP timeout: `check` must fail, not hang, on a connection that
            # a network fault left half open.
            conn = psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=10,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=2,
                tcp_user_timeout=10_000,
            )
        except psycopg.OperationalError as exc:
            raise unreachable(self.url, exc) from exc
        try:
            (got,) = conn.execute("SELECT pg_try_advisory_lock(%s)", (RUN_LOCK_KEY,)).fetchone()
        except psycopg.OperationalError as exc:
            conn.close()
            raise unreachable(self.url, exc) from exc
        if not got:
            conn.close()
            raise RunLocked(
                "another run holds the run lock (Postgres advisory lock "
                f"{RUN_LOCK_KEY}); refusing to start run {self.owner!r}"
            )
        self.conn = conn

    def check(self) -> None:
        if self.conn is not None and not self.conn.closed:
            try:
                self.conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                pass  # the session ended (a restart of Postgres): the lock went with it
        logger.warning("the run lock's session ended; taking the lock again for %s", self.owner)
        self.release()
        try:
            self.acquire()
        except RunLocked as exc:
            raise RunLocked(f"run {self.owner!r} lost the run lock to another run") from exc

    def release(self) -> None:
        if self.conn is None:
            return
        conn, self.conn = self.conn, None
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (RUN_LOCK_KEY,))
        except psycopg.Error:
            pass  # a dead session holds nothing
        finally:
            conn.close()


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    return redact(url)


def unreachable(url: str, exc: Exception) -> StoreUnavailable:
    message = f"Postgres at {safe_url(url)} is unreachable: {exc}"
    return StoreUnavailable(message, component=DATABASE)
