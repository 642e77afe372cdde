"""The run lifecycle's rules that do not depend on scoring: who runs a run, how long a write
may be retried, and reconciliation of the records and keyspaces with what is served.

States: ``queued -> running -> publishing -> published | failed``, and ``superseded`` once a
later run is published. The flip of ``current`` in the online store is the commit point:
before it, a failure discards the run's keyspace; after it, the store is never touched again
and the record's update is retried until it lands. Whatever a dead process left behind is
settled by :func:`reconcile` under the run lock, with the online store's ``current`` as the
truth about what is served.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    stop_when_event_set,
    wait_exponential_jitter,
)

from encore.database import Database, RunRecord
from encore.errors import StoreUnavailable
from encore.online import OnlineStore, RunInfo

logger = logging.getLogger("encore.scheduler.lifecycle")

# What waiting can cure: a server away, or the embedded database locked past its busy timeout.
RETRIED = (StoreUnavailable, sqlite3.OperationalError)


def process_owner() -> str:
    """This process, as run records name the process running them."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def within_budget(budget_seconds: float, stop: threading.Event) -> Retrying:
    """Retry a store or database call that fails for want of the server, for a while.

    Before the flip: a blip (a restart, a failover) must not fail a run, and a server that
    stays down past the budget must, so that the run's keyspace is discarded.
    """
    return Retrying(
        stop=stop_after_delay(budget_seconds) | stop_when_event_set(stop),
        wait=wait_exponential_jitter(multiplier=0.1, max=5.0, jitter=0.1),
        sleep=stop.wait,  # a stop request ends the wait at once, then the retries
        retry=retry_if_exception_type(RETRIED),
        before_sleep=before_sleep_log(logger, logging.WARNING),
        reraise=True,
    )


def until_it_lands(stop: threading.Event) -> Retrying:
    """Retry a record update after the flip until it lands (or the process is told to stop:
    then the next start's reconciliation records what the store already says)."""
    return Retrying(
        stop=stop_when_event_set(stop),
        wait=wait_exponential_jitter(multiplier=0.1, max=10.0, jitter=0.1),
        sleep=stop.wait,
        retry=retry_if_exception_type(RETRIED),
        before_sleep=before_sleep_log(logger, logging.WARNING),
        reraise=True,
    )


def maintain(db: Database, store: OnlineStore, *, grace_seconds: int, me: str | None) -> None:
    """Reconcile the records with the store, then sweep abandoned keyspaces (run lock held)."""
    reconcile(db, store, me=me)
    sweep(db, store, grace_seconds=grace_seconds)


def reconcile(db: Database, store: OnlineStore, *, me: str | None) -> None:
    """Settle every unfinished record but ``me``'s, however old, against what is served.

    Holding the run lock, no other process is running a run: a ``running`` or ``publishing``
    record belongs to a process that is gone. Queued records wait for the scheduler.
    """
    current = store.current()
    served = current.run_id if current else None
    for record in db.open_runs():
        if record.run_id == me or record.status == "queued":
            continue
        if served is not None and served in (record.run_id, _rollback_target(record)):
            # Its process died after the flip, before the record said so.
            logger.warning("run %s is served: recording it as published", record.run_id)
            db.record_flip(record.run_id, served=served, **_flip_times(record, current))
            continue
        logger.warning(
            "run %s was %s by %s, which is gone: recording it as failed",
            record.run_id,
            record.status,
            record.owner or "an unknown process",
        )
        db.update_run(
            record.run_id,
            status="failed",
            finished_at=datetime.now(UTC),
            error=_interrupted(record),
        )
        if _has_own_keyspace(record):
            store.discard(record.run_id)  # never the served run: the store checks
    if served is None:
        return
    record = db.get_run(served)
    if record is None:
        logger.warning("the served run %s has no record in the database", served)
    elif record.status != "published":
        logger.warning("run %s is served but recorded as %s: fixed", served, record.status)
        db.record_flip(served, served=served, error=None, **_flip_times(record, current))
    else:
        db.record_flip(served, served=served)  # supersedes any other published full run


def sweep(db: Database, store: OnlineStore, *, grace_seconds: int) -> None:
    """Remove keyspaces that nothing will ever serve (run lock held, before a run begins).

    A keyspace that never published belongs to no live run: it is removed now rather than
    when its pending TTL ends. A replaced run whose expiry was never set (a flip whose second
    step was lost) is given its grace period.
    """
    current = store.current()
    for stored in store.runs():
        if current is not None and stored.run_id == current.run_id:
            continue
        if stored.published_at is None:
            logger.info("removing the abandoned keyspace of run %s", stored.run_id)
            store.discard(stored.run_id)
        elif stored.expires_in is None:
            logger.info(
                "run %s was replaced but kept for good: it expires in %d s",
                stored.run_id,
                grace_seconds,
            )
            store.expire(stored.run_id, grace_seconds)


def _rollback_target(record: RunRecord) -> str | None:
    return record.target_run_id if record.kind == "rollback" else None


def _has_own_keyspace(record: RunRecord) -> bool:
    return record.target_run_id is None


def _flip_times(record: RunRecord, current: RunInfo | None) -> dict:
    published = (
        datetime.fromtimestamp(current.published_at, UTC)
        if current is not None and current.published_at is not None
        else datetime.now(UTC)
    )
    values = {}
    if record.finished_at is None:
        # A rollback's own flip is not the target's first publication: it ended now, or so.
        values["finished_at"] = published if record.target_run_id is None else datetime.now(UTC)
    if record.published_at is None and record.target_run_id is None:
        values["published_at"] = published
    return values


def _interrupted(record: RunRecord) -> str:
    who = record.owner or "the process running it"
    if record.kind == "backfill" and record.target_run_id is not None:
        return (
            f"interrupted: {who} stopped before the backfill finished; the users it rescored "
            "keep their new lists, the others their old ones (run the backfill again)"
        )
    if record.status == "publishing":
        return f"interrupted: {who} stopped before the flip; nothing this run wrote was served"
    return f"interrupted: {who} stopped before publishing; nothing this run wrote was served"


class ProgressSaver:
    """Saves a run's progress to its record from a thread of its own, every few seconds.

    Progress is only informative: a database that is slow or down must not stall scoring,
    so a failed save is logged and the next one carries the figures.
    """

    def __init__(
        self, open_db: Callable[[], Database], run_id: str, *, every_seconds: float = 2.0
    ) -> None:
        self.open_db = open_db
        self.run_id = run_id
        self.every_seconds = every_seconds
        self._latest: dict[str, int] | None = None  # users_scored, cold_users
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"progress-{run_id}", daemon=True)
        self._thread.start()

    def update(self, **values: int) -> None:
        with self._lock:
            self._latest = values

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=self.every_seconds + 1)

    def _loop(self) -> None:
        db: Database | None = None
        try:
            while not self._closed.wait(self.every_seconds):
                with self._lock:
                    values, self._latest = self._latest, None
                if values is None:
                    continue
                try:
                    db = db or self.open_db()
                    db.save_progress(self.run_id, **values)
                except (*RETRIED, sqlite3.Error) as exc:
                    logger.warning("progress of run %s not saved: %s", self.run_id, exc)
        finally:
            if db is not None:
                db.close()
