"""The nightly run, backfills and rollbacks: lock, score in a spawn process pool, write,
verify, flip, record. The states and the rules for faults are in :mod:`scheduler.lifecycle`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime

import numpy as np

from encore.bundle import open_bundle, promoted_bundle
from encore.database import Database, RunRecord, new_run_id, open_database
from encore.database.base import RunLock
from encore.errors import EncoreError, RunLocked
from encore.experiments import Challenger, Experiment
from encore.online import OnlineStore, open_online_store
from encore.progress import Progress
from encore.settings import Settings
from scheduler.lifecycle import process_owner, within_budget
from scheduler.run_metrics import RunMetrics
from scheduler.runner import Plan, PlanMaker, RunExecution

logger = logging.getLogger("encore.scheduler.job")

# A nightly run's phases before scoring (ingest, refresh: training/freshness.py, wired by the
# CLI), run under the run lock; returns the seconds of each phase.
Prepare = Callable[[Database, threading.Event], dict[str, float]]


def run_full(
    settings: Settings,
    *,
    kind: str = "manual",
    run_id: str | None = None,
    progress: Progress | None = None,
    metrics: RunMetrics | None = None,
    stop: threading.Event | None = None,
    prepare: Prepare | None = None,
) -> RunRecord:
    """Score every user of the promoted bundle and publish the run; return its record.

    With ``prepare``, the run first brings the promoted model up to date with it (under the
    run lock, as the run's first phases)."""
    stop = stop or threading.Event()
    persist = within_budget(settings.store_retry_seconds, stop)

    def plan(db: Database, store: OnlineStore, record: RunRecord) -> Plan:
        phases = prepare(db, stop) if prepare is not None else {}
        bundle = promoted_bundle(settings.bundles_dir)
        n_users = len(bundle.user_ids())
        batches = [
            range(s, min(n_users, s + settings.batch_size))
            for s in range(0, n_users, settings.batch_size)
        ]
        arm = _current_arm(persist(db.get_experiment), bundle.version)
        return Plan(
            bundle,
            record.run_id,
            batches,
            n_users,
            settings.top_n,
            flip=True,
            challenger=open_bundle(settings.bundles_dir, arm.version) if arm else None,
            arm=arm,
            phases=phases,
        )

    return _run(settings, kind, run_id, plan, progress=progress, metrics=metrics, stop=stop)


def _current_arm(experiment: Experiment | None, champion: str) -> Challenger | None:
    if experiment is None:
        return None
    if experiment.champion != champion:
        # Promoting ends an experiment; a PROMOTED file changed by hand does not.
        logger.warning(
            "experiment %s compares %s with %s, but %s is promoted: scoring everyone with %s",
            experiment.experiment_id,
            experiment.challenger,
            experiment.champion,
            champion,
            champion,
        )
        return None
    return experiment.arm


def run_backfill(
    settings: Settings,
    user_ids: Iterable[int],
    *,
    run_id: str | None = None,
    progress: Progress | None = None,
    metrics: RunMetrics | None = None,
    stop: threading.Event | None = None,
) -> RunRecord:
    """Rescore some users into the current run; others keep their lists. Idempotent."""
    wanted = np.unique(np.fromiter(user_ids, dtype=np.int64))

    def plan(db: Database, store: OnlineStore, record: RunRecord) -> Plan:
        current = store.current()
        if current is None:
            raise EncoreError("no published run to backfill into: run `encore run` first")
        bundle = open_bundle(settings.bundles_dir, current.model_version)
        codes = bundle.user_codes(wanted)
        unknown = wanted[codes < 0]
        if len(unknown):
            logger.warning(
                "%d users are not in model %s and keep the fallback (first: %s)",
                len(unknown),
                bundle.version,
                unknown[:5].tolist(),
            )
        known = np.sort(codes[codes >= 0])
        db.update_run(record.run_id, target_run_id=current.run_id)
        batches = [
            known[s : s + settings.batch_size] for s in range(0, len(known), settings.batch_size)
        ]
        # Rescored users stay in the arm the served run put them in.
        arm = current.challenger
        return Plan(
            bundle,
            current.run_id,
            batches,
            len(known),
            current.top_n,
            flip=False,
            challenger=open_bundle(settings.bundles_dir, arm.version) if arm else None,
            arm=arm,
        )

    return _run(settings, "backfill", run_id, plan, progress=progress, metrics=metrics, stop=stop)


def rollback(settings: Settings, run_id: str, *, stop: threading.Event | None = None) -> RunRecord:
    """Serve an earlier run again (within its grace period); recorded as a run of its own."""
    stop = stop or threading.Event()
    with _resources(settings) as (db, store), ExitStack() as held:
        lock = _take_lock(held, settings, db, "rollback", None, None, stop)
        target = db.get_run(run_id)
        if (
            target is None
            or target.target_run_id
            or target.status
            not in (
                "published",
                "superseded",
            )
        ):
            raise EncoreError(f"run {run_id!r} is not a published full run")
        current = store.current()
        if current is not None and current.run_id == run_id:
            raise EncoreError(f"run {run_id!r} is already the one served")
        record = _open_record(
            settings,
            db,
            "rollback",
            None,
            stop,
            target_run_id=run_id,
            model_version=target.model_version,
        )
        return RunExecution(settings, db, store, lock, record, None, None, stop).rollback()


def run_queued(
    settings: Settings,
    *,
    metrics: RunMetrics | None = None,
    stop: threading.Event | None = None,
    prepare: Prepare | None = None,
) -> list[RunRecord]:
    """Execute the runs queued through the API, oldest first, while the lock is free."""
    stop = stop or threading.Event()
    finished: list[RunRecord] = []
    tried: set[str] = set()
    while not stop.is_set():
        with open_database(settings) as db:
            record = db.next_queued()
            if record is None or record.run_id in tried:
                break
            users = db.requested_users(record.run_id)
        tried.add(record.run_id)
        logger.info(
            "executing run %s (%s), queued at %s", record.run_id, record.kind, record.created_at
        )
        try:
            if record.kind == "backfill" and users is not None:
                finished.append(
                    run_backfill(settings, users, run_id=record.run_id, metrics=metrics, stop=stop)
                )
            else:
                finished.append(
                    run_full(
                        settings,
                        kind=record.kind,
                        run_id=record.run_id,
                        metrics=metrics,
                        stop=stop,
                        prepare=prepare,
                    )
                )
        except RunLocked:
            logger.info("run %s stays queued: another run holds the lock", record.run_id)
            break
        except EncoreError as exc:
            logger.error("queued run %s failed: %s", record.run_id, exc)
    return finished


def _run(
    settings: Settings,
    kind: str,
    run_id: str | None,
    plan: PlanMaker,
    *,
    progress: Progress | None,
    metrics: RunMetrics | None,
    stop: threading.Event | None,
) -> RunRecord:
    stop = stop or threading.Event()
    with _resources(settings) as (db, store), ExitStack() as held:
        lock = _take_lock(held, settings, db, kind, run_id, metrics, stop)
        record = _open_record(settings, db, kind, run_id, stop)
        return RunExecution(settings, db, store, lock, record, metrics, progress, stop).execute(
            plan
        )


@contextmanager
def _resources(settings: Settings) -> Iterator[tuple[Database, OnlineStore]]:
    db = open_database(settings)
    try:
        store = open_online_store(settings)
        try:
            yield db, store
        finally:
            store.close()
    finally:
        db.close()


def _take_lock(
    held: ExitStack,
    settings: Settings,
    db: Database,
    kind: str,
    run_id: str | None,
    metrics: RunMetrics | None,
    stop: threading.Event,
) -> RunLock:
    try:
        return within_budget(settings.store_retry_seconds, stop)(
            lambda: held.enter_context(db.run_lock(run_id or kind))
        )
    except RunLocked as exc:
        if metrics:
            metrics.lock_contention.inc()
        if run_id is None:  # a queued record stays queued, to be tried again
            now = datetime.now(UTC)
            db.create_run(
                RunRecord(
                    new_run_id(now), kind, "failed", created_at=now, finished_at=now, error=str(exc)
                )
            )
        raise


def _open_record(
    settings: Settings,
    db: Database,
    kind: str,
    run_id: str | None,
    stop: threading.Event,
    **values: object,
) -> RunRecord:
    """The run's record, running: a queued one claimed, or a new one (run lock held)."""
    now = datetime.now(UTC)
    values = {"owner": process_owner(), "started_at": now, **values}
    persist = within_budget(settings.store_retry_seconds, stop)
    if run_id is not None:
        claimed = persist(db.claim_run, run_id, **values)
        existing = persist(db.get_run, run_id)
        if claimed or (
            # A retried claim whose first try landed (its reply was lost) finds it ours.
            existing is not None
            and existing.status == "running"
            and (existing.owner, existing.started_at) == (values["owner"], now)
        ):
            return existing
        if existing is not None:
            raise EncoreError(f"run {run_id!r} is {existing.status}, not queued")
    record = RunRecord(run_id or new_run_id(now), kind, "running", created_at=now, **values)
    persist(db.create_run, record)
    return record
