"""SQLite backend of run records and feedback (the embedded default); a file lock for runs."""

from __future__ import annotations

import asyncio
import fcntl
import functools
import json
import sqlite3
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from encore.database import experiment_sql
from encore.database.base import (
    RUN_FIELDS,
    AsyncDatabase,
    Database,
    FeedbackConflict,
    FeedbackEvent,
    RunLock,
    RunRecord,
    migrations,
)
from encore.errors import DATABASE, RunLocked, StoreUnavailable
from encore.experiments import Experiment, VersionCounts, experiment_running

TIME_FIELDS = ("created_at", "started_at", "finished_at", "published_at")


def _connect(path: Path, *, busy_timeout_seconds: float = 30.0) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(
            path, timeout=busy_timeout_seconds, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: an acknowledged feedback event survives a power cut, not only a crash.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_seconds * 1000)}")
    except sqlite3.Error as exc:
        raise StoreUnavailable(
            f"cannot open the SQLite database {path}: {exc}", component=DATABASE
        ) from exc
    conn.row_factory = sqlite3.Row
    return conn


def _to_text(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    if isinstance(value, list | dict):
        return json.dumps(value)
    return value


def _run_from_row(row: sqlite3.Row) -> RunRecord:
    values = {name: row[name] for name in RUN_FIELDS}
    for name in TIME_FIELDS:
        if values[name]:
            values[name] = datetime.fromisoformat(values[name])
    for name in ("popularity_deciles", "users_by_version", "phases"):
        if values[name]:
            values[name] = json.loads(values[name])
    return RunRecord(**values)


def _event_from_row(row: sqlite3.Row) -> FeedbackEvent:
    return FeedbackEvent(
        event_id=uuid.UUID(row["event_id"]),
        user_id=row["user_id"],
        run_id=row["run_id"],
        liked_playlist_id=row["liked_playlist_id"],
        shown_playlist_ids=json.loads(row["shown_playlist_ids"]),
        model_version=row["model_version"],
        created_at=datetime.fromisoformat(row["created_at"]),
        kind=row["kind"],
        experiment_id=row["experiment_id"],
    )


def _insert_run(conn: sqlite3.Connection, record: RunRecord) -> None:
    values = {name: _to_text(getattr(record, name)) for name in RUN_FIELDS}
    values["created_at"] = values["created_at"] or _to_text(datetime.now(UTC))
    present = [k for k, v in values.items() if v is not None]
    conn.execute(
        f"INSERT INTO runs ({', '.join(present)}) VALUES ({', '.join('?' * len(present))})"
        " ON CONFLICT (run_id) DO NOTHING",
        [values[k] for k in present],
    )


def _update_run(
    conn: sqlite3.Connection, run_id: str, values: dict[str, Any], *, where: str = ""
) -> int:
    unknown = set(values) - set(RUN_FIELDS)
    if unknown:
        raise ValueError(f"unknown run record fields: {sorted(unknown)}")
    assignments = ", ".join(f"{k} = ?" for k in values)
    cursor = conn.execute(
        f"UPDATE runs SET {assignments} WHERE run_id = ?{where}",
        [_to_text(v) for v in values.values()] + [run_id],
    )
    return cursor.rowcount


def _enqueue_run(
    conn: sqlite3.Connection, record: RunRecord, user_ids: Sequence[int] | None
) -> None:
    with conn:
        conn.execute("BEGIN IMMEDIATE")
        _insert_run(conn, record)
        if user_ids is not None:
            conn.execute(
                "INSERT INTO run_requests VALUES (?, ?)",
                (record.run_id, json.dumps([int(u) for u in user_ids])),
            )


def _list_runs(conn: sqlite3.Connection, limit: int) -> list[RunRecord]:
    rows = conn.execute("SELECT * FROM runs ORDER BY created_at DESC LIMIT ?", (limit,))
    return [_run_from_row(r) for r in rows]


def _get_run(conn: sqlite3.Connection, run_id: str) -> RunRecord | None:
    row = conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return _run_from_row(row) if row else None


class _FileLock(RunLock):
    def check(self) -> None:
        """A lock on an open file descriptor cannot be lost while the process lives."""


class SQLiteDatabase(Database):
    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = _connect(path)
        self.upgrade()  # the embedded default needs no separate migration step

    def upgrade(self) -> list[str]:
        applied = []
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
                " name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            done = {r[0] for r in self.conn.execute("SELECT version FROM schema_migrations")}
            for number, name, sql in migrations(self.dialect):
                if number in done:
                    continue
                for statement in sql.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                    (number, name, _to_text(datetime.now(UTC))),
                )
                applied.append(name)
        return applied

    def create_run(self, record: RunRecord) -> None:
        _insert_run(self.conn, record)

    def save_progress(self, run_id: str, *, users_scored: int, cold_users: int) -> None:
        values = {"users_scored": users_scored, "cold_users": cold_users}
        _update_run(self.conn, run_id, values, where=" AND status = 'running'")

    def update_run(self, run_id: str, **values: Any) -> None:
        _update_run(self.conn, run_id, values)

    def get_run(self, run_id: str) -> RunRecord | None:
        return _get_run(self.conn, run_id)

    def list_runs(self, *, limit: int = 50) -> list[RunRecord]:
        return _list_runs(self.conn, limit)

    def last_published(self, *, full_only: bool = True) -> RunRecord | None:
        kinds = "AND target_run_id IS NULL" if full_only else ""
        row = self.conn.execute(
            f"SELECT * FROM runs WHERE status = 'published' {kinds} "
            "ORDER BY finished_at DESC LIMIT 1"
        ).fetchone()
        return _run_from_row(row) if row else None

    def enqueue_run(self, record: RunRecord, user_ids: Sequence[int] | None = None) -> None:
        _enqueue_run(self.conn, record, user_ids)

    def claim_run(self, run_id: str, **values: Any) -> bool:
        values = {**values, "status": "running"}
        return _update_run(self.conn, run_id, values, where=" AND status = 'queued'") == 1

    def next_queued(self) -> RunRecord | None:
        row = self.conn.execute(
            "SELECT * FROM runs WHERE status = 'queued' ORDER BY created_at LIMIT 1"
        ).fetchone()
        return _run_from_row(row) if row else None

    def open_runs(self) -> list[RunRecord]:
        rows = self.conn.execute(
            "SELECT * FROM runs WHERE status IN ('queued', 'running', 'publishing') "
            "ORDER BY created_at"
        )
        return [_run_from_row(r) for r in rows]

    def requested_users(self, run_id: str) -> list[int] | None:
        row = self.conn.execute(
            "SELECT user_ids FROM run_requests WHERE run_id = ?", (run_id,)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def record_flip(self, run_id: str, *, served: str, **values: Any) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            _update_run(self.conn, run_id, {**values, "status": "published"})
            self.conn.execute(
                "UPDATE runs SET status = 'published' WHERE run_id = ? AND status = 'superseded'",
                (served,),
            )
            self.conn.execute(
                "UPDATE runs SET status = 'superseded' WHERE status = 'published'"
                " AND target_run_id IS NULL AND run_id <> ?",
                (served,),
            )

    @contextmanager
    def run_lock(self, owner: str) -> Iterator[RunLock]:
        # flock is released by the kernel when the holder dies, like an advisory lock.
        lock_path = self.path.with_name("run.lock")
        with lock_path.open("a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise RunLocked(
                    f"another run holds the run lock ({lock_path}); refusing to start run {owner!r}"
                ) from exc
            try:
                yield _FileLock()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def feedback_since(
        self, since: datetime, *, chunk: int = 10_000
    ) -> Iterator[list[FeedbackEvent]]:
        cursor = self.conn.execute(
            "SELECT * FROM feedback WHERE created_at >= ? ORDER BY created_at, event_id",
            (_to_text(since),),
        )
        while rows := cursor.fetchmany(chunk):
            yield [_event_from_row(r) for r in rows]

    def start_experiment(self, experiment: Experiment) -> None:
        try:
            with self.conn:
                self.conn.execute(
                    experiment_sql.INSERT, experiment_sql.insert_values(experiment, self.dialect)
                )
        except sqlite3.IntegrityError as exc:
            raise experiment_running(self.get_experiment()) from exc

    def end_experiment(self, reason: str) -> Experiment | None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            ended = experiment_sql.fetch_experiment(self.conn, self.dialect, None)
            if ended is not None:
                ended.ended_at, ended.end_reason = datetime.now(UTC), reason
                self.conn.execute(
                    experiment_sql.END,
                    (_to_text(ended.ended_at), reason, ended.experiment_id),
                )
        return ended

    def get_experiment(self, experiment_id: str | None = None) -> Experiment | None:
        return experiment_sql.fetch_experiment(self.conn, self.dialect, experiment_id)

    def last_experiment(self) -> Experiment | None:
        return experiment_sql.fetch_one(self.conn, self.dialect, experiment_sql.LAST, ())

    def experiment_counts(self, experiment_id: str) -> list[VersionCounts]:
        return experiment_sql.fetch_counts(self.conn, self.dialect, experiment_id)

    def ping(self) -> None:
        try:
            self.conn.execute("SELECT 1")
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite database {self.path}: {exc}") from exc

    def close(self) -> None:
        self.conn.close()


class AsyncSQLiteDatabase(AsyncDatabase):
    """One connection, used by one thread of its own: calls are serialised there.

    Its own thread, not the event loop's shared pool: a request blocked on another
    process's write lock must not hold the threads the online store's reads run in.
    """

    def __init__(self, path: Path, *, busy_timeout_seconds: float = 5.0) -> None:
        self.path = path
        # Shorter than the batch side's: a request waiting on another process's write lock
        # is answered 503 (and retried by its client) rather than held for half a minute.
        self.busy_timeout_seconds = busy_timeout_seconds
        self.conn: sqlite3.Connection | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encore-sqlite")

    async def open(self) -> None:
        self.conn = await asyncio.get_running_loop().run_in_executor(
            self._thread,
            functools.partial(_connect, self.path, busy_timeout_seconds=self.busy_timeout_seconds),
        )

    async def _run(self, fn, *args):
        def call():
            if self.conn is None:
                raise StoreUnavailable(
                    f"SQLite database {self.path} is not open", component=DATABASE
                )
            try:
                return fn(self.conn, *args)
            except sqlite3.Error as exc:  # locked, I/O error, corrupt file, closed...
                raise StoreUnavailable(
                    f"SQLite database {self.path}: {exc}", component=DATABASE
                ) from exc

        return await asyncio.get_running_loop().run_in_executor(self._thread, call)

    async def insert_feedback(self, event: FeedbackEvent) -> bool:
        def insert(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "INSERT INTO feedback (event_id, user_id, run_id, model_version,"
                " liked_playlist_id, shown_playlist_ids, created_at, kind, experiment_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
                (
                    str(event.event_id),
                    event.user_id,
                    event.run_id,
                    event.model_version,
                    event.liked_playlist_id,
                    json.dumps(list(event.shown_playlist_ids)),
                    _to_text(datetime.now(UTC)),
                    event.kind,
                    event.experiment_id,
                ),
            )
            if cursor.rowcount == 1:
                return True
            row = conn.execute(
                "SELECT * FROM feedback WHERE event_id = ?", (str(event.event_id),)
            ).fetchone()
            if row is not None and not event.same_event(_event_from_row(row)):
                raise FeedbackConflict(str(event.event_id))
            return False

        return await self._run(insert)

    async def enqueue_run(self, record: RunRecord, user_ids: Sequence[int] | None = None) -> None:
        await self._run(_enqueue_run, record, user_ids)

    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self._run(_get_run, run_id)

    async def list_runs(self, *, limit: int = 50) -> list[RunRecord]:
        return await self._run(_list_runs, limit)

    async def get_experiment(self, experiment_id: str | None = None) -> Experiment | None:
        return await self._run(experiment_sql.fetch_experiment, "sqlite", experiment_id)

    async def experiment_counts(self, experiment_id: str) -> list[VersionCounts]:
        return await self._run(experiment_sql.fetch_counts, "sqlite", experiment_id)

    async def ping(self, *, timeout_seconds: float | None = None) -> None:
        # A connection is always at hand: the wait is bounded by the caller (/readyz).
        await self._run(lambda c: c.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            # In its thread, after whatever is queued there.
            await asyncio.get_running_loop().run_in_executor(self._thread, conn.close)
        self._thread.shutdown(wait=False)
