"""The Ray engine: a run's batches as a Ray Dataset, scored by actors that each load the model
versions once and write their lists to the run's keyspace themselves.

Only counts travel back to the driver, which feeds them to the run's accounting
(``sink.written``) and verifies and flips as after the local engine. Ray is imported here, when
a run uses this engine: ``uv sync --extra ray``.

The actors read the bundle by its path: on a cluster, ``ENCORE_HOME`` must be the same shared
directory (e.g. NFS) on every node, and the online store one every node reaches (Redis).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from encore.bundle import Bundle
from encore.errors import RunStopped
from encore.experiments import Challenger
from encore.ray_cluster import import_ray, join_ray
from encore.settings import Settings
from inference import BatchCounts, ScoredBatch, Users
from scheduler.engines import BatchSink

logger = logging.getLogger("encore.scheduler.ray")

BLOCKS_PER_ACTOR = 8


def score_in_ray(
    settings: Settings,
    bundle: Bundle,
    batches: list,
    top_n: int,
    sink: BatchSink,
    *,
    stop: threading.Event,
    challenger: Bundle | None = None,
    arm: Challenger | None = None,
) -> None:
    """Score and write the batches with Ray Data actors; count each batch as it is written.

    Joins the cluster at ``ENCORE_RAY_ADDRESS``, or starts a local Ray for the run (and stops
    it after). When ``stop`` is set, no further batch is counted, the dataset's execution is
    shut down and :class:`~encore.errors.RunStopped` is raised.
    """
    ray = import_ray()
    started = join_ray(settings.ray_address)
    try:
        actors = actor_count(settings)
        # Paths as the driver sees them: an actor's working directory is not the driver's.
        worker_settings = settings.model_copy(update={"home": settings.home.resolve()})
        # A Ray task per few dozen batches rather than per batch: its scheduling costs as much
        # as scoring a batch. Eight per actor still balance the end of the run.
        blocks = max(1, min(len(batches), actors * BLOCKS_PER_ACTOR))
        dataset = ray.data.from_items(_rows(batches), override_num_blocks=blocks).map_batches(
            ScoreAndWrite,
            batch_size=None,  # a whole block per call: its batches' writes overlap scoring
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
            fn_constructor_kwargs={
                "settings": worker_settings,
                "bundle_path": str(bundle.path.resolve()),
                "top_n": top_n,
                "challenger_path": str(challenger.path.resolve()) if challenger else None,
                "arm": arm.as_json() if arm else None,
                "write_into": sink.write_into,
                "delete_cold": sink.delete_cold,
            },
        )
        logger.info("scoring %d batches with %d Ray actors", len(batches), actors)
        rows = dataset.iter_rows()
        try:
            for row in rows:
                if stop.is_set():
                    raise RunStopped("stopped on request before the flip")
                sink.written(_counts(row))
            if stop.is_set():
                raise RunStopped("stopped on request before the flip")
        except ray.exceptions.RayActorError as exc:
            # The run's record says worker_died, as when a pool process dies.
            from concurrent.futures.process import BrokenProcessPool

            raise BrokenProcessPool(f"a Ray scoring actor died: {exc}") from exc
        finally:
            close = getattr(rows, "close", None)
            if close is not None:
                close()  # shuts the dataset's execution down, its actors with it
    finally:
        if started:
            ray.shutdown()


def actor_count(settings: Settings) -> int:
    """ENCORE_RAY_ACTORS, or one actor per CPU of the Ray cluster; at least 1, at most the CPUs."""
    ray = import_ray()
    # The cluster's total, not what is free this instant: the free count dips while a
    # previous dataset's actors are still being released, and would size the pool by a race.
    cpus = max(1, int(ray.cluster_resources().get("CPU", 0)))
    if not settings.ray_actors:
        return cpus
    if settings.ray_actors > cpus:
        # An actor needs a CPU of its own: more than there are would wait for ever.
        logger.warning(
            "ENCORE_RAY_ACTORS=%d but the Ray cluster has %d CPUs: using %d actors",
            settings.ray_actors,
            cpus,
            cpus,
        )
        return cpus
    return settings.ray_actors


class ScoreAndWrite:
    """A Ray Data actor: the model versions loaded once, each batch scored and written."""

    def __init__(
        self,
        *,
        settings: Settings,
        bundle_path: str,
        top_n: int,
        challenger_path: str | None,
        arm: dict | None,
        write_into: str,
        delete_cold: bool,
    ) -> None:
        import torch

        from encore.online import open_online_store
        from inference import load_arms
        from scheduler.lifecycle import within_budget

        torch.set_num_threads(settings.torch_threads)
        self.model = load_arms(
            Path(bundle_path),
            top_n=top_n,
            challenger=Path(challenger_path) if challenger_path else None,
            arm=Challenger.from_json(arm) if arm else None,
        )
        self.store = open_online_store(settings)
        self.persist = within_budget(settings.store_retry_seconds, threading.Event())
        self.write_into, self.delete_cold = write_into, delete_cold
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="encore-write")

    def _write(self, result: ScoredBatch) -> None:
        self.persist(self.store.write_batch, self.write_into, result.user_ids, result.payloads)
        unlisted = result.unlisted_user_ids
        if self.delete_cold and len(unlisted):
            self.persist(self.store.delete_users, self.write_into, unlisted)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score a block's batches, each written while the next is scored (as the pool's parent
        writes while its workers score); every write has landed when the counts go back."""
        out: dict[str, list] = {"lists": [], "cold": [], "listed_cold": [], "deciles": []}
        out["seconds"] = []
        out["by_version"] = []
        writing: Future | None = None
        for users in _users(batch):
            clock = time.perf_counter()
            result = self.model.score(users)
            if writing is not None:
                writing.result()
            writing = self.writer.submit(self._write, result)
            counts = result.counts()
            out["lists"].append(counts.lists)
            out["cold"].append(counts.cold)
            out["listed_cold"].append(counts.listed_cold)
            out["deciles"].append(result.deciles)
            out["seconds"].append(time.perf_counter() - clock)
            out["by_version"].append(json.dumps(result.by_version))
        if writing is not None:
            writing.result()
        return {
            "lists": np.asarray(out["lists"], dtype=np.int64),
            "cold": np.asarray(out["cold"], dtype=np.int64),
            "listed_cold": np.asarray(out["listed_cold"], dtype=np.int64),
            "deciles": np.stack(out["deciles"]).astype(np.int64),
            "seconds": np.asarray(out["seconds"], dtype=np.float64),
            "by_version": np.asarray(out["by_version"], dtype=object),
        }


def _rows(batches: list) -> list[dict]:
    """A full run's batches as ranges of user codes; a backfill's as the codes themselves."""
    if all(isinstance(b, range) for b in batches):
        return [{"start": b.start, "stop": b.stop} for b in batches]
    return [{"codes": np.asarray(b, dtype=np.int64).tolist()} for b in batches]


def _users(batch: dict[str, np.ndarray]) -> Iterator[Users]:
    if "codes" in batch:
        for codes in batch["codes"]:
            yield np.asarray(codes, dtype=np.int64)
    else:
        for start, stop in zip(batch["start"].tolist(), batch["stop"].tolist(), strict=True):
            yield range(start, stop)


def _counts(row: dict) -> BatchCounts:
    return BatchCounts(
        lists=int(row["lists"]),
        cold=int(row["cold"]),
        listed_cold=int(row["listed_cold"]),
        deciles=np.asarray(row["deciles"], dtype=np.int64),
        seconds=float(row["seconds"]),
        by_version=json.loads(row["by_version"]),
    )
