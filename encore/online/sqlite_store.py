"""SQLite backend of the online store: the embedded default under ENCORE_HOME (WAL mode).

The pointer flip is one transaction; readers in other processes see either the old run or
the new one, never a half-written run. Replaced runs keep their rows until their grace period
ends; expired and abandoned runs are purged when the next run begins.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from encore.errors import ONLINE_STORE, RunFailed, StoreUnavailable
from encore.experiments import Challenger
from encore.online.base import AsyncOnlineReader, OnlineStore, RunInfo, StoredRun

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    model_version TEXT NOT NULL,
    top_n INTEGER NOT NULL,
    users INTEGER NOT NULL DEFAULT 0,
    fallback BLOB NOT NULL,
    created_at REAL NOT NULL,
    published_at REAL,
    expires_at REAL,
    previous TEXT,
    challenger TEXT
);
CREATE TABLE IF NOT EXISTS recs (
    run_id TEXT NOT NULL,
    user_id INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (run_id, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS names (
    run_id TEXT NOT NULL,
    playlist_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (run_id, playlist_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pointer (
    name TEXT PRIMARY KEY,
    run_id TEXT NOT NULL
);
"""
RUN_COLUMNS = "run_id, model_version, top_n, users, fallback, created_at, published_at, challenger"


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.executescript(SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(runs)")}
        # Columns added since the first release, to a store created before them.
        for column in ("previous", "challenger"):
            if column not in columns:
                conn.execute(f"ALTER TABLE runs ADD COLUMN {column} TEXT")
    except sqlite3.Error as exc:
        raise StoreUnavailable(
            f"cannot open the SQLite online store {path}: {exc}", component=ONLINE_STORE
        ) from exc
    return conn


def _info(row: tuple | None) -> RunInfo | None:
    if row is None:
        return None
    run_id, model_version, top_n, users, fallback, created_at, published_at, challenger = row
    return RunInfo(
        run_id,
        model_version,
        top_n,
        users,
        bytes(fallback),
        created_at,
        published_at,
        Challenger.from_json(json.loads(challenger)) if challenger else None,
    )


def _select_in(conn: sqlite3.Connection, run_id: str, user_ids: Sequence[int]) -> list:
    ids = [int(u) for u in user_ids]
    found: dict[int, bytes] = {}
    for start in range(0, len(ids), 900):  # stays under SQLite's bound-variable limit
        chunk = ids[start : start + 900]
        marks = ",".join("?" * len(chunk))
        found.update(
            conn.execute(
                f"SELECT user_id, payload FROM recs WHERE run_id = ? AND user_id IN ({marks})",
                (run_id, *chunk),
            ).fetchall()
        )
    return [found.get(u) for u in ids]


class SQLiteOnlineStore(OnlineStore):
    def __init__(self, path: Path, *, pending_ttl_seconds: int = 6 * 3600) -> None:
        self.path = path
        self.pending_ttl_seconds = pending_ttl_seconds
        self.conn = connect(path)

    def begin_run(
        self,
        run_id: str,
        *,
        model_version: str,
        top_n: int,
        fallback: bytes,
        names: dict[int, str] | None = None,
        challenger: Challenger | None = None,
    ) -> None:
        now = time.time()
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self._purge(now)
            self.conn.execute("DELETE FROM recs WHERE run_id = ?", (run_id,))
            self.conn.execute("DELETE FROM names WHERE run_id = ?", (run_id,))
            self.conn.execute(
                "INSERT OR REPLACE INTO runs (run_id, model_version, top_n, users, fallback,"
                " created_at, published_at, expires_at, challenger)"
                " VALUES (?, ?, ?, 0, ?, ?, NULL, ?, ?)",
                (
                    run_id,
                    model_version,
                    top_n,
                    fallback,
                    now,
                    now + self.pending_ttl_seconds,
                    json.dumps(challenger.as_json()) if challenger else None,
                ),
            )
            if names:
                self.conn.executemany(
                    "INSERT INTO names VALUES (?, ?, ?)",
                    ((run_id, int(k), v) for k, v in names.items()),
                )

    def _purge(self, now: float) -> None:
        current = self._current_id()
        stale = [
            r
            for (r,) in self.conn.execute(
                "SELECT run_id FROM runs WHERE expires_at IS NOT NULL AND expires_at < ?", (now,)
            )
            if r != current
        ]
        for run_id in stale:
            for table in ("recs", "names", "runs"):
                self.conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))

    def write_batch(self, run_id: str, user_ids: Sequence[int], payloads: Sequence[bytes]) -> None:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(
                "INSERT OR REPLACE INTO recs VALUES (?, ?, ?)",
                ((run_id, int(u), p) for u, p in zip(user_ids, payloads, strict=True)),
            )
            # A run being written never expires, however long it takes; an abandoned one does.
            self.conn.execute(
                "UPDATE runs SET expires_at = ? WHERE run_id = ? AND published_at IS NULL",
                (time.time() + self.pending_ttl_seconds, run_id),
            )

    def delete_users(self, run_id: str, user_ids: Sequence[int]) -> None:
        with self.conn:
            self.conn.executemany(
                "DELETE FROM recs WHERE run_id = ? AND user_id = ?",
                ((run_id, int(u)) for u in user_ids),
            )

    def count(self, run_id: str) -> int:
        return self.conn.execute(
            "SELECT count(*) FROM recs WHERE run_id = ?", (run_id,)
        ).fetchone()[0]

    def publish(
        self, run_id: str, *, users_total: int, cold_users: int, grace_seconds: int
    ) -> None:
        now = time.time()
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            previous = self._current_id()
            if previous != run_id:
                if self.run_info(run_id) is None:
                    raise RunFailed(f"run {run_id!r} has no keyspace in {self.path}")
                written = self.count(run_id)
                if written + cold_users != users_total:
                    raise RunFailed(
                        f"run {run_id!r} holds {written} lists and {cold_users} cold users, "
                        f"but {users_total} users were scored"
                    )
                self.conn.execute(
                    "UPDATE runs SET published_at = COALESCE(published_at, ?), expires_at = NULL,"
                    " users = ?, previous = ? WHERE run_id = ?",
                    (now, written, previous, run_id),
                )
                self.conn.execute(
                    "INSERT OR REPLACE INTO pointer (name, run_id) VALUES ('current', ?)",
                    (run_id,),
                )
            # As in Redis: the predecessor recorded at the flip expires, unless it does already.
            self.conn.execute(
                "UPDATE runs SET expires_at = ? WHERE expires_at IS NULL AND run_id <> ?"
                " AND run_id = (SELECT previous FROM runs WHERE run_id = ?)",
                (now + grace_seconds, run_id, run_id),
            )

    def rollback(self, run_id: str, *, grace_seconds: int) -> RunInfo:
        info = self.run_info(run_id)
        expired = self.conn.execute(
            "SELECT expires_at IS NOT NULL AND expires_at < ? FROM runs WHERE run_id = ?",
            (time.time(), run_id),
        ).fetchone()
        if info is None or info.published_at is None or (expired and expired[0]):
            raise RunFailed(
                f"run {run_id!r} is no longer readable (its grace period ended or it never "
                "published); only runs within the grace period can be restored"
            )
        self.publish(run_id, users_total=info.users, cold_users=0, grace_seconds=grace_seconds)
        return info

    def discard(self, run_id: str) -> bool:
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            if self._current_id() == run_id:
                return False
            for table in ("recs", "names", "runs"):
                self.conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
        return True

    def runs(self) -> list[StoredRun]:
        now = time.time()
        with self.conn:
            self.conn.execute("BEGIN IMMEDIATE")
            self._purge(now)
            rows = self.conn.execute("SELECT run_id, published_at, expires_at FROM runs").fetchall()
        return [
            StoredRun(run_id, published, expires - now if expires is not None else None)
            for run_id, published, expires in rows
        ]

    def expire(self, run_id: str, seconds: int) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE runs SET expires_at = ? WHERE run_id = ? AND expires_at IS NULL",
                (time.time() + seconds, run_id),
            )

    def run_info(self, run_id: str) -> RunInfo | None:
        return _info(
            self.conn.execute(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
        )

    def _current_id(self) -> str | None:
        row = self.conn.execute("SELECT run_id FROM pointer WHERE name = 'current'").fetchone()
        return row[0] if row else None

    def current(self) -> RunInfo | None:
        return _info(
            self.conn.execute(
                f"SELECT {RUN_COLUMNS} FROM runs JOIN pointer USING (run_id) "
                "WHERE pointer.name = 'current'"
            ).fetchone()
        )

    def read(self, run_id: str, user_ids: Sequence[int]) -> list[bytes | None]:
        return _select_in(self.conn, run_id, user_ids)

    def ping(self) -> None:
        try:
            self.conn.execute("SELECT 1")
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"SQLite online store {self.path}: {exc}", component=ONLINE_STORE
            ) from exc

    def close(self) -> None:
        self.conn.close()


class AsyncSQLiteReader(AsyncOnlineReader):
    """Runs queries in worker threads, one read connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.path)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    async def _run(self, fn, *args):
        def call():
            try:
                return fn(self._conn(), *args)
            except sqlite3.Error as exc:
                raise StoreUnavailable(
                    f"SQLite online store {self.path}: {exc}", component=ONLINE_STORE
                ) from exc

        return await asyncio.to_thread(call)

    async def current(self) -> RunInfo | None:
        return await self._run(
            lambda c: _info(
                c.execute(
                    f"SELECT {RUN_COLUMNS} FROM runs JOIN pointer USING (run_id) "
                    "WHERE pointer.name = 'current'"
                ).fetchone()
            )
        )

    async def read(self, run_id: str, user_ids: Sequence[int]) -> list[bytes | None]:
        return await self._run(_select_in, run_id, user_ids)

    async def names(self, run_id: str, playlist_ids: Sequence[int]) -> list[str | None]:
        def lookup(conn: sqlite3.Connection) -> list[str | None]:
            ids = [int(p) for p in playlist_ids][:900]
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            query = (
                f"SELECT playlist_id, name FROM names WHERE run_id = ? AND playlist_id IN ({marks})"
            )
            found = dict(conn.execute(query, (run_id, *ids)).fetchall())
            return [found.get(p) for p in ids]

        return await self._run(lookup)

    async def ping(self) -> None:
        await self._run(lambda c: c.execute("SELECT 1").fetchone())

    async def aclose(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
