"""The online store: published recommendation lists, one keyspace per run.

A run writes its users' lists into its own keyspace, then ``publish`` verifies coverage and
flips the ``current`` pointer atomically. The previous run stays readable for a grace period
(and for rollback); a run that never publishes is never visible and its keyspace expires.
Values are the JSON bytes of the list (``[12,7,3]``), encoded once by the batch job, so the
API copies them into responses without decoding them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from encore.experiments import Assignment, Challenger


@dataclass(frozen=True)
class RunInfo:
    """What the online store keeps about one run's keyspace."""

    run_id: str
    model_version: str
    top_n: int
    users: int  # lists written (cold users are not written: they read the fallback)
    fallback: bytes  # JSON bytes of the run's popularity list
    created_at: float  # epoch seconds
    published_at: float | None  # first publication; None while the run is being written
    # The experiment's challenger, when the run scored its share of users with it.
    challenger: Challenger | None = None

    @cached_property
    def assignment(self) -> Assignment | None:
        """Which users the challenger scored; None when the run had no challenger."""
        return Assignment(self.challenger) if self.challenger else None

    def version_of(self, user_id: int) -> str:
        """The model version whose arm the user is in: the one that chose its list."""
        if self.assignment is None:
            return self.model_version
        return self.assignment.version_of(user_id, self.model_version)


@dataclass(frozen=True)
class StoredRun:
    """A run keyspace as the store holds it, for the sweep of abandoned ones."""

    run_id: str
    published_at: float | None
    expires_in: float | None  # seconds until the store removes it; None: kept for good


def truncate(payload: bytes, n: int) -> bytes:
    """The first ``n`` ids of a JSON list of integers, still as JSON bytes."""
    parts = payload.split(b",", n)
    if len(parts) <= n:
        return payload
    return b",".join(parts[:n]) + b"]"


class OnlineStore(ABC):
    """Synchronous side, used by the batch job and the CLI."""

    @abstractmethod
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
        """Create the run's keyspace: invisible until published, and removed by the store
        when nothing was written into it for the store's pending TTL (an abandoned run)."""

    @abstractmethod
    def write_batch(self, run_id: str, user_ids: Sequence[int], payloads: Sequence[bytes]) -> None:
        """Write one batch of lists into the run's keyspace, in one round trip."""

    @abstractmethod
    def delete_users(self, run_id: str, user_ids: Sequence[int]) -> None:
        """Remove lists (the users then read the run's fallback)."""

    @abstractmethod
    def count(self, run_id: str) -> int:
        """Lists written into the run's keyspace."""

    @abstractmethod
    def publish(
        self, run_id: str, *, users_total: int, cold_users: int, grace_seconds: int
    ) -> None:
        """Verify coverage, then flip ``current`` to the run atomically; idempotent.

        Inside the flip's transaction, the lists the store holds plus ``cold_users`` must
        equal ``users_total``, or :class:`~encore.errors.RunFailed` is raised and nothing
        changes. The run that was current is recorded as the run's predecessor, and then
        expires ``grace_seconds`` later; a retry after a lost reply (``current`` already is
        the run) only makes sure of that expiry.
        """

    @abstractmethod
    def rollback(self, run_id: str, *, grace_seconds: int) -> RunInfo:
        """Make a still-readable earlier run current again."""

    @abstractmethod
    def discard(self, run_id: str) -> bool:
        """Delete a run's keyspace; False, and nothing deleted, if it is the current run.

        The check and the delete are one transaction: whatever a process believes, the run
        being served is never removed.
        """

    @abstractmethod
    def runs(self) -> list[StoredRun]:
        """Every run keyspace the store holds (expired ones are gone)."""

    @abstractmethod
    def expire(self, run_id: str, seconds: int) -> None:
        """Make a run's keyspace expire in ``seconds``, unless it expires already."""

    @abstractmethod
    def run_info(self, run_id: str) -> RunInfo | None:
        """The run's metadata, or None when its keyspace is gone."""

    @abstractmethod
    def current(self) -> RunInfo | None:
        """The published run readers are served from."""

    @abstractmethod
    def read(self, run_id: str, user_ids: Sequence[int]) -> list[bytes | None]:
        """Stored lists in the order asked; None where a user has none."""

    @abstractmethod
    def ping(self) -> None:
        """Raise :class:`~encore.errors.StoreUnavailable` when the store cannot be reached."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncOnlineReader(ABC):
    """Read side for the API server."""

    @abstractmethod
    async def current(self) -> RunInfo | None: ...

    @abstractmethod
    async def read(self, run_id: str, user_ids: Sequence[int]) -> list[bytes | None]: ...

    @abstractmethod
    async def names(self, run_id: str, playlist_ids: Sequence[int]) -> list[str | None]: ...

    @abstractmethod
    async def ping(self) -> None: ...

    @abstractmethod
    async def aclose(self) -> None: ...
