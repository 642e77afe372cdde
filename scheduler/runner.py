"""One run, from its running record to published or failed: plan, score, verify, flip,
record. The rules it follows under faults are in :mod:`scheduler.lifecycle`."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import numpy as np
import orjson
import pandas as pd

from encore.bundle import Bundle
from encore.database import Database, RunRecord, open_database
from encore.database.base import RunLock
from encore.errors import EncoreError, RunFailed, RunLocked, RunStopped, StoreUnavailable
from encore.experiments import Challenger
from encore.online import OnlineStore
from encore.progress import Progress
from encore.redact import redact
from encore.settings import Settings
from inference import BatchCounts, ScoredBatch, load_arms
from scheduler.drift import compare_runs
from scheduler.engines import BatchSink, engine_for
from scheduler.lifecycle import ProgressSaver, maintain, until_it_lands, within_budget
from scheduler.run_metrics import RunMetrics

logger = logging.getLogger("encore.scheduler.job")

LOCK_CHECK_SECONDS = 2.0


@dataclass
class Totals:
    lists: int = 0
    cold: int = 0
    listed_cold: int = 0  # cold users with a list of their own (the rest read the fallback)
    deciles: np.ndarray = field(default_factory=lambda: np.zeros(10, dtype=np.int64))
    by_version: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class Plan:
    """What a run scores, and where its lists go."""

    bundle: Bundle
    write_into: str  # the run's own keyspace, or the served run's for a backfill
    batches: list
    users_total: int
    top_n: int
    flip: bool  # a full run: its own keyspace, made current at the end
    # An experiment's challenger, scoring its arm's users; None: the champion scores all.
    challenger: Bundle | None = None
    arm: Challenger | None = None
    # Seconds of the phases done while planning (a nightly run's ingest and refresh); the
    # run adds its own: score, and for a full run publish.
    phases: dict[str, float] = field(default_factory=dict)


PlanMaker = Callable[[Database, OnlineStore, RunRecord], Plan]


class RunExecution:
    """One run from its running record to published or failed."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        store: OnlineStore,
        lock: RunLock,
        record: RunRecord,
        metrics: RunMetrics | None,
        progress: Progress | None,
        stop: threading.Event,
    ) -> None:
        self.settings, self.db, self.store, self.lock = settings, db, store, lock
        self.record, self.metrics, self.stop = record, metrics, stop
        self.report = progress or (lambda *a, **k: None)
        self.persist = within_budget(settings.store_retry_seconds, stop)
        self.clock = time.perf_counter()
        self.flip_unknown = False  # the store did not answer the flip: reconciled later

    @property
    def run_id(self) -> str:
        return self.record.run_id

    def execute(self, make_plan: PlanMaker) -> RunRecord:
        plan: Plan | None = None
        try:
            self._maintain()
            plan = make_plan(self.db, self.store, self.record)
            self.persist(
                self.db.update_run,
                self.run_id,
                model_version=plan.bundle.version,
                users_total=plan.users_total,
                **_experiment_values(plan),
            )
            clock = time.perf_counter()
            totals = self._score(plan)
            phases = {**plan.phases, "score": round(time.perf_counter() - clock, 3)}
            clock = time.perf_counter()
            values = {
                "users_scored": totals.lists + totals.cold,
                "cold_users": totals.cold,
                "popularity_deciles": totals.deciles.tolist(),
                "users_by_version": dict(totals.by_version),
            }
            if plan.flip:
                values.update(self.persist(_drift, self.db, totals, plan.users_total))
                self.persist(self.db.update_run, self.run_id, status="publishing", **values)
                self.persist(self.lock.check)
                self._flip(
                    self.store.publish,
                    self.run_id,
                    users_total=plan.users_total,
                    # The store counts users without a list of their own.
                    cold_users=totals.cold - totals.listed_cold,
                    grace_seconds=self.settings.run_grace_seconds,
                )
                phases["publish"] = round(time.perf_counter() - clock, 3)
            values["phases"] = phases
        except BaseException as exc:
            self._fail(exc, discard=plan is not None and plan.flip)
            if isinstance(exc, EncoreError | KeyboardInterrupt):
                raise
            raise RunFailed(f"run {self.run_id} failed ({_reason(exc)}): {exc}") from exc
        return self._finish(values, served=self.run_id if plan.flip else None)

    def rollback(self) -> RunRecord:
        target = self.record.target_run_id
        try:
            self._maintain()
            self.persist(self.db.update_run, self.run_id, status="publishing")
            self.persist(self.lock.check)
            self._flip(self.store.rollback, target, grace_seconds=self.settings.run_grace_seconds)
        except BaseException as exc:
            self._fail(exc, discard=False)  # the keyspace is the target's, still needed
            raise
        return self._finish({}, served=target)

    def _maintain(self) -> None:
        self.persist(
            maintain,
            self.db,
            self.store,
            grace_seconds=self.settings.run_grace_seconds,
            me=self.run_id,
        )

    def _score(self, plan: Plan) -> Totals:
        totals = Totals()
        saver = ProgressSaver(lambda: open_database(self.settings), self.run_id)
        last_check = [time.monotonic()]

        def on_result(result: ScoredBatch) -> None:
            write_clock = time.perf_counter()
            self.persist(self.store.write_batch, plan.write_into, result.user_ids, result.payloads)
            unlisted = result.unlisted_user_ids
            if not plan.flip and len(unlisted):
                self.persist(self.store.delete_users, plan.write_into, unlisted)
            counts = result.counts()
            count(replace(counts, seconds=counts.seconds + time.perf_counter() - write_clock))

        def count(counts: BatchCounts) -> None:
            totals.lists += counts.lists
            totals.cold += counts.cold
            totals.listed_cold += counts.listed_cold
            totals.deciles += counts.deciles
            totals.by_version.update(counts.by_version)
            if self.metrics:
                self.metrics.batch_seconds.observe(counts.seconds)
                self.metrics.deciles.add(counts.deciles)
            done = totals.lists + totals.cold
            self.report("score users", done, plan.users_total)
            saver.update(users_scored=done, cold_users=totals.cold)
            if time.monotonic() - last_check[0] > LOCK_CHECK_SECONDS:
                # A database restart frees the lock: take it back soon, or stop, rather than
                # write on while another run may reconcile this one away.
                self.persist(self.lock.check)
                last_check[0] = time.monotonic()

        try:
            if plan.flip:
                self.persist(
                    self.store.begin_run,
                    self.run_id,
                    model_version=plan.bundle.version,
                    top_n=plan.top_n,
                    fallback=fallback_payload(plan.bundle, plan.top_n),
                    names=catalog_names(plan.bundle),
                    challenger=plan.arm,
                )
            self.report("score users", 0, plan.users_total)
            if len(plan.batches) <= 1 and not plan.flip:
                # A handful of users: spinning up a pool would cost more than scoring them.
                model = load_arms(
                    plan.bundle, top_n=plan.top_n, challenger=plan.challenger, arm=plan.arm
                )
                for batch in plan.batches:
                    if self.stop.is_set():
                        raise RunStopped("stopped on request before the flip")
                    on_result(model.score(batch))
            else:
                engine_for(self.settings.engine)(
                    self.settings,
                    plan.bundle,
                    plan.batches,
                    plan.top_n,
                    BatchSink(on_result, count, plan.write_into, delete_cold=not plan.flip),
                    stop=self.stop,
                    challenger=plan.challenger,
                    arm=plan.arm,
                )
        finally:
            saver.close()
        return totals

    def _flip(self, flip: Callable[..., object], *args: object, **kwargs: object) -> None:
        try:
            self.persist(flip, *args, **kwargs)
        except RunFailed:
            raise  # refused before the flip: coverage, or no keyspace
        except BaseException:
            # Anything else (the store going quiet, a second Ctrl-C) may have come after the
            # flip landed: only `current` can tell, at the next start's reconciliation.
            self.flip_unknown = True
            raise

    def _fail(self, exc: BaseException, *, discard: bool) -> None:
        reason = _reason(exc)
        if self.metrics:
            self.metrics.failures.labels(reason).inc()
            self.metrics.runs.labels(self.record.kind, "failed").inc()
        if self.flip_unknown:
            logger.error(
                "run %s: the online store did not answer the flip (%s); the record stays "
                "'publishing' and the next run start records what `current` says",
                self.run_id,
                redact(str(exc)),
            )
            return
        if discard:
            try:
                if not self.store.discard(self.run_id):
                    logger.error("run %s is served after all: kept, reconciled later", self.run_id)
                    return
            except StoreUnavailable:
                logger.warning("could not discard run %s: the sweep removes it", self.run_id)
        try:
            self.persist(
                self.db.update_run,
                self.run_id,
                status="failed",
                finished_at=datetime.now(UTC),
                duration_seconds=time.perf_counter() - self.clock,
                error=redact(f"{reason}: {exc}"),
            )
        except StoreUnavailable:
            logger.error(
                "run %s failed (%s) and its record could not say so; the next run start will",
                self.run_id,
                reason,
            )

    def _finish(self, values: dict, *, served: str | None) -> RunRecord:
        """After the flip (or a backfill's last write): never fails, never touches the store."""
        now = datetime.now(UTC)
        final = {**values, "finished_at": now, "duration_seconds": time.perf_counter() - self.clock}
        try:
            if served is None:  # a backfill
                until_it_lands(self.stop)(
                    self.db.update_run, self.run_id, status="published", **final
                )
            else:
                if served == self.run_id:
                    final["published_at"] = now
                until_it_lands(self.stop)(self.db.record_flip, self.run_id, served=served, **final)
        except StoreUnavailable:
            logger.error(
                "run %s is published and served; its record could not say so yet, the next "
                "run start will",
                self.run_id,
            )
        if self.metrics:
            self.metrics.runs.labels(self.record.kind, "published").inc()

        logger.info(
            "run %s published (%s): %s users, %s cold, in %.1f s",
            self.run_id,
            self.record.kind,
            final.get("users_scored", "-"),
            final.get("cold_users", "-"),
            final["duration_seconds"],
        )
        try:
            return self.persist(self.db.get_run, self.run_id)
        except StoreUnavailable:
            return replace(self.record, status="published", **final)


def fallback_payload(bundle: Bundle, top_n: int) -> bytes:
    """The run's popularity list: its most popular playlists, as JSON bytes."""
    order = np.argsort(-bundle.popularity(), kind="stable")[:top_n]
    return orjson.dumps(np.asarray(bundle.playlist_ids())[order].tolist())


def catalog_names(bundle: Bundle) -> dict[int, str]:
    if bundle.catalog_path is None:
        return {}
    catalog = pd.read_parquet(bundle.catalog_path)
    return dict(zip(catalog["playlist_id"].tolist(), catalog["name"].tolist(), strict=True))


def _experiment_values(plan: Plan) -> dict:
    if plan.arm is None:
        return {}
    return {
        "experiment_id": plan.arm.experiment_id,
        "challenger_version": plan.arm.version,
        "challenger_share": plan.arm.share,
    }


def _drift(db: Database, totals: Totals, users_total: int) -> dict:
    previous = db.last_published()
    if previous is None or not previous.popularity_deciles:
        return {}
    drift = compare_runs(
        totals.deciles.tolist(),
        totals.cold,
        users_total,
        previous.popularity_deciles,
        previous.cold_users,
        previous.users_total,
    )
    return {"drift_score": drift.score, "drift_pvalue": drift.chi2_pvalue}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BrokenProcessPool):
        return "worker_died"
    if isinstance(exc, RunStopped | KeyboardInterrupt):
        return "stopped"
    if isinstance(exc, StoreUnavailable):
        return "store_unavailable"
    if isinstance(exc, RunLocked):
        return "lock_lost"
    if isinstance(exc, RunFailed):
        return "verification"
    return "error"
