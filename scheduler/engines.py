"""The engines that score a run's batches, and what they hand their results to.

An engine is a function of the shape of :func:`scheduler.pool.score_in_pool`: ``(settings,
bundle, batches, top_n, sink, *, stop, challenger=None, arm=None)``. It calls ``sink(result)``
with each :class:`~inference.ScoredBatch` for the run to write, or, when its own workers wrote
the lists to ``sink.write_into``, ``sink.written(counts)``. Either way the run counts the batch,
saves its progress and checks its lock; it verifies and flips the same way after any engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from encore.errors import EncoreError
from encore.settings import ENGINES
from inference import BatchCounts, ScoredBatch

Engine = Callable[..., None]


@dataclass(frozen=True)
class BatchSink:
    """Where an engine hands each scored batch."""

    write: Callable[[ScoredBatch], None]  # writes the lists, then counts them
    written: Callable[[BatchCounts], None]  # counts lists an engine's worker wrote itself
    write_into: str  # the run's keyspace (the served run's for a backfill)
    delete_cold: bool  # a backfill: a user now cold loses the list it had

    def __call__(self, result: ScoredBatch) -> None:
        self.write(result)


def engine_for(name: str) -> Engine:
    """The engine named by ``ENCORE_ENGINE`` (or ``encore run --engine``)."""
    if name == "local":
        from scheduler.pool import score_in_pool

        return score_in_pool
    if name == "ray":
        from scheduler.ray_engine import score_in_ray

        return score_in_ray
    raise EncoreError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}")
