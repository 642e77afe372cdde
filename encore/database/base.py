"""The database of run records and feedback events: interfaces, records and migrations.

Postgres when ENCORE_DATABASE_URL is set, SQLite under ENCORE_HOME otherwise. The schema is
applied by ``encore db upgrade`` from numbered SQL files, one dialect per directory.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from importlib import resources
from typing import Any

from encore.experiments import Experiment, VersionCounts

# Run states: queued -> running -> publishing -> published | failed, and superseded once a
# later run is published. A record is "open" until it reaches one of the other states.
OPEN_STATUSES = ("queued", "running", "publishing")


@dataclass
class RunRecord:
    run_id: str
    kind: str
    status: str
    model_version: str | None = None
    target_run_id: str | None = None  # a backfill writes into it; a rollback serves it again
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    users_total: int = 0
    users_scored: int = 0
    cold_users: int = 0
    duration_seconds: float | None = None
    drift_score: float | None = None
    drift_pvalue: float | None = None
    popularity_deciles: list[int] | None = None
    error: str | None = None
    published_at: datetime | None = None  # when its flip made it current the first time
    owner: str | None = None  # host and pid of the process that ran it
    # The experiment a full run scored its challenger's users for, and users per version.
    experiment_id: str | None = None
    challenger_version: str | None = None
    challenger_share: float | None = None
    users_by_version: dict[str, int] | None = None
    # Seconds per phase: a nightly run's ingest and refresh, every run's score and publish.
    phases: dict[str, float] | None = None

    @property
    def cold_fraction(self) -> float | None:
        return self.cold_users / self.users_total if self.users_total else None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, datetime):
                data[key] = value.isoformat()
        data["cold_fraction"] = self.cold_fraction
        data["progress"] = (
            round(self.users_scored / self.users_total, 4) if self.users_total else None
        )
        return data


RUN_FIELDS = tuple(f.name for f in fields(RunRecord))


@dataclass(frozen=True)
class FeedbackEvent:
    """A list shown to a user (``view``) or a playlist liked in it (``like``)."""

    event_id: uuid.UUID
    user_id: int
    run_id: str
    liked_playlist_id: int | None  # None for a view
    shown_playlist_ids: list[int]
    model_version: str | None = None  # derived by the server from the run and the user
    created_at: datetime | None = field(default=None, compare=False)
    kind: str = "like"
    experiment_id: str | None = None

    def same_event(self, other: FeedbackEvent) -> bool:
        """Whether a retry carries the event that was stored (not another one reusing its id)."""
        return (
            self.kind == other.kind
            and self.user_id == other.user_id
            and self.run_id == other.run_id
            and self.liked_playlist_id == other.liked_playlist_id
            and list(self.shown_playlist_ids) == list(other.shown_playlist_ids)
        )


class FeedbackConflict(Exception):
    """An event id that is already stored for a different event."""


def new_run_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%S}Z-{uuid.uuid4().hex[:6]}"


def migrations(dialect: str) -> list[tuple[int, str, str]]:
    """(number, name, sql) of every migration file of a dialect, in order."""
    folder = resources.files("encore.database") / "migrations" / dialect
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            number = int(entry.name.split("_", 1)[0])
            found.append((number, entry.name, entry.read_text()))
    return sorted(found)


class RunLock(ABC):
    """The held run lock."""

    @abstractmethod
    def check(self) -> None:
        """Raise :class:`~encore.errors.RunLocked` if the lock was lost and cannot be had back.

        A database restart ends the session that held it; until the flip, a run that lost its
        lock takes it again or stops, so that only one run ever flips ``current``.
        """


class Database(ABC):
    """Synchronous side: the batch job, the scheduler and the CLI."""

    dialect: str

    @abstractmethod
    def upgrade(self) -> list[str]:
        """Apply pending migrations; return the names applied."""

    @abstractmethod
    def create_run(self, record: RunRecord) -> None:
        """Insert the record; one already stored under its id is left as it is (a retry)."""

    @abstractmethod
    def save_progress(self, run_id: str, *, users_scored: int, cold_users: int) -> None:
        """Progress of a running run; a no-op once the run has moved on (a late save)."""

    @abstractmethod
    def update_run(self, run_id: str, **values: Any) -> None: ...

    @abstractmethod
    def get_run(self, run_id: str) -> RunRecord | None: ...

    @abstractmethod
    def list_runs(self, *, limit: int = 50) -> list[RunRecord]: ...

    @abstractmethod
    def last_published(self, *, full_only: bool = True) -> RunRecord | None:
        """The most recently finished published run (full runs only, by default)."""

    @abstractmethod
    def enqueue_run(self, record: RunRecord, user_ids: Sequence[int] | None = None) -> None:
        """Insert a queued record (and the users of a backfill) in one transaction."""

    @abstractmethod
    def claim_run(self, run_id: str, **values: Any) -> bool:
        """Move a queued record to running with ``values``; False if it is not queued."""

    @abstractmethod
    def next_queued(self) -> RunRecord | None:
        """The oldest queued record."""

    @abstractmethod
    def open_runs(self) -> list[RunRecord]:
        """Every queued, running or publishing record, however old, oldest first."""

    @abstractmethod
    def requested_users(self, run_id: str) -> list[int] | None:
        """The user ids a queued backfill was asked for; None for a full run."""

    @abstractmethod
    def record_flip(self, run_id: str, *, served: str, **values: Any) -> None:
        """After a flip, in one transaction: ``run_id`` is published (with ``values``), the
        run whose keyspace is ``served`` is published, every other published full run is
        superseded."""

    @abstractmethod
    def run_lock(self, owner: str) -> AbstractContextManager[RunLock]:
        """Hold the cluster-wide run lock; raise :class:`~encore.errors.RunLocked` if taken."""

    @abstractmethod
    def feedback_since(
        self, since: datetime, *, chunk: int = 10_000
    ) -> Iterator[list[FeedbackEvent]]:
        """Feedback events created at or after ``since``, in chunks, oldest first."""

    @abstractmethod
    def start_experiment(self, experiment: Experiment) -> None:
        """Record a new current experiment; :class:`~encore.errors.ExperimentError` if one
        is already current."""

    @abstractmethod
    def end_experiment(self, reason: str) -> Experiment | None:
        """End the current experiment (if any) and return it."""

    @abstractmethod
    def get_experiment(self, experiment_id: str | None = None) -> Experiment | None:
        """An experiment by id; without one, the current one."""

    @abstractmethod
    def last_experiment(self) -> Experiment | None:
        """The most recently started experiment, current or ended."""

    @abstractmethod
    def experiment_counts(self, experiment_id: str) -> list[VersionCounts]:
        """Views and likes per model version of the experiment's events."""

    @abstractmethod
    def ping(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncDatabase(ABC):
    """Async side for the API server."""

    @abstractmethod
    async def open(self) -> None: ...

    @abstractmethod
    async def insert_feedback(self, event: FeedbackEvent) -> bool:
        """Store the event durably; False when that event id was already stored.

        Raises :class:`FeedbackConflict` when the id is stored for a different event.
        """

    @abstractmethod
    async def enqueue_run(self, record: RunRecord, user_ids: Sequence[int] | None = None) -> None:
        """Insert a queued record (and the users of a backfill) in one transaction."""

    @abstractmethod
    async def get_run(self, run_id: str) -> RunRecord | None: ...

    @abstractmethod
    async def list_runs(self, *, limit: int = 50) -> list[RunRecord]: ...

    @abstractmethod
    async def get_experiment(self, experiment_id: str | None = None) -> Experiment | None:
        """An experiment by id; without one, the current one."""

    @abstractmethod
    async def experiment_counts(self, experiment_id: str) -> list[VersionCounts]:
        """Views and likes per model version of the experiment's events."""

    @abstractmethod
    async def ping(self, *, timeout_seconds: float | None = None) -> None:
        """Raise :class:`~encore.errors.StoreUnavailable` unless a query is answered.

        ``timeout_seconds`` bounds the wait for a connection (a readiness probe's budget).
        """

    @abstractmethod
    async def aclose(self) -> None: ...
