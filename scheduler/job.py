"""The nightly run and backfills: lock, score in a spawn process pool, write, verify, publish."""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import orjson
import pandas as pd

from encore.bundle import Bundle, open_bundle, promoted_bundle
from encore.database import Database, RunRecord, new_run_id, open_database
from encore.errors import EncoreError, RunFailed, RunLocked, StoreUnavailable
from encore.online import OnlineStore, open_online_store
from encore.settings import Settings
from scheduler.drift import compare_runs
from scheduler.metrics import RunMetrics
from scheduler.worker import BatchResult, Scorer, init_worker, score_batch

logger = logging.getLogger("encore.scheduler.job")

Progress = Callable[..., None]
PROGRESS_SAVE_SECONDS = 2.0


@dataclass
class Totals:
    lists: int = 0
    cold: int = 0
    deciles: np.ndarray = field(default_factory=lambda: np.zeros(10, dtype=np.int64))


def run_full(
    settings: Settings,
    *,
    kind: str = "manual",
    run_id: str | None = None,
    progress: Progress | None = None,
    metrics: RunMetrics | None = None,
) -> RunRecord:
    """Score every user of the promoted bundle and publish the run; return its record."""
    with _resources(settings) as (db, store):
        record = _claim(db, run_id, kind)
        with _locked(db, record, metrics):
            bundle = promoted_bundle(settings.bundles_dir)
            n_users = len(bundle.user_ids())
            return _execute(
                settings,
                db,
                store,
                record,
                bundle,
                metrics,
                write_into=record.run_id,
                batches=[
                    (s, min(n_users, s + settings.batch_size))
                    for s in range(0, n_users, settings.batch_size)
                ],
                users_total=n_users,
                top_n=settings.top_n,
                progress=progress,
            )


def run_backfill(
    settings: Settings,
    user_ids: Iterable[int],
    *,
    run_id: str | None = None,
    progress: Progress | None = None,
    metrics: RunMetrics | None = None,
) -> RunRecord:
    """Rescore some users into the current run; others keep their lists. Idempotent."""
    with _resources(settings) as (db, store):
        record = _claim(db, run_id, "backfill")
        with _locked(db, record, metrics):
            current = store.current()
            if current is None:
                raise EncoreError("no published run to backfill into: run `encore run` first")
            bundle = open_bundle(settings.bundles_dir, current.model_version)
            wanted = np.unique(np.fromiter(user_ids, dtype=np.int64))
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
            record.target_run_id = current.run_id
            db.update_run(record.run_id, target_run_id=current.run_id)
            return _execute(
                settings,
                db,
                store,
                record,
                bundle,
                metrics,
                write_into=current.run_id,
                batches=[
                    known[s : s + settings.batch_size]
                    for s in range(0, len(known), settings.batch_size)
                ],
                users_total=len(known),
                top_n=current.top_n,
                progress=progress,
            )


def rollback(settings: Settings, run_id: str) -> RunRecord:
    """Serve an earlier run again (it must still be within its grace period)."""
    with _resources(settings) as (db, store):
        record = db.get_run(run_id)
        if record is None or record.status != "published" or record.target_run_id:
            raise EncoreError(f"run {run_id!r} is not a published full run")
        with db.run_lock(f"rollback-{run_id}"):
            store.rollback(run_id, grace_seconds=settings.run_grace_seconds)
            db.update_run(run_id, finished_at=datetime.now(UTC))
        return db.get_run(run_id)


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


def _claim(db: Database, run_id: str | None, kind: str) -> RunRecord:
    """The run's record: one created by `POST /v1/runs` (queued), or a new one."""
    if run_id is not None:
        existing = db.get_run(run_id)
        if existing is not None:
            if existing.status != "queued":
                raise EncoreError(f"run {run_id!r} is {existing.status}, not queued")
            return existing
    now = datetime.now(UTC)
    record = RunRecord(run_id or new_run_id(now), kind, "queued", created_at=now)
    db.create_run(record)
    return record


@contextmanager
def _locked(db: Database, record: RunRecord, metrics: RunMetrics | None) -> Iterator[None]:
    try:
        with db.run_lock(record.run_id):
            # Holding the lock, any other "running" record belongs to a process that died.
            for other in db.list_runs(limit=20):
                if other.status == "running" and other.run_id != record.run_id:
                    db.update_run(
                        other.run_id,
                        status="failed",
                        finished_at=datetime.now(UTC),
                        error="interrupted: the process running it stopped before publishing",
                    )
            yield
    except RunLocked as exc:
        if metrics:
            metrics.lock_contention.inc()
        db.update_run(record.run_id, status="failed", error=str(exc), finished_at=datetime.now(UTC))
        raise
    except BaseException as exc:
        # Failures before scoring started (no bundle, no current run) still close the record.
        stored = db.get_run(record.run_id)
        if stored is not None and stored.status == "queued":
            db.update_run(
                record.run_id, status="failed", error=str(exc), finished_at=datetime.now(UTC)
            )
        raise


def _execute(
    settings: Settings,
    db: Database,
    store: OnlineStore,
    record: RunRecord,
    bundle: Bundle,
    metrics: RunMetrics | None,
    *,
    write_into: str,
    batches: list,
    users_total: int,
    top_n: int,
    progress: Progress | None,
) -> RunRecord:
    report = progress or (lambda *a, **k: None)
    started = datetime.now(UTC)
    clock = time.perf_counter()
    full_run = write_into == record.run_id
    db.update_run(
        record.run_id,
        status="running",
        model_version=bundle.version,
        started_at=started,
        users_total=users_total,
    )
    totals = Totals()
    last_save = time.monotonic()

    def on_result(result: BatchResult) -> None:
        nonlocal last_save
        write_clock = time.perf_counter()
        store.write_batch(write_into, result.user_ids, result.payloads)
        if not full_run and len(result.cold_user_ids):
            store.delete_users(write_into, result.cold_user_ids)
        totals.lists += len(result.user_ids)
        totals.cold += len(result.cold_user_ids)
        totals.deciles += result.deciles
        if metrics:
            metrics.batch_seconds.observe(result.seconds + time.perf_counter() - write_clock)
            metrics.deciles.add(result.deciles)
        done = totals.lists + totals.cold
        report("score users", done, users_total)
        if time.monotonic() - last_save > PROGRESS_SAVE_SECONDS:
            db.update_run(record.run_id, users_scored=done, cold_users=totals.cold)
            last_save = time.monotonic()

    try:
        if full_run:
            store.begin_run(
                record.run_id,
                model_version=bundle.version,
                top_n=top_n,
                fallback=fallback_payload(bundle, top_n),
                names=catalog_names(bundle),
            )
        report("score users", 0, users_total)
        if len(batches) <= 1 and not full_run:
            # A handful of users: spinning up a pool would cost more than scoring them.
            scorer = Scorer(bundle.path, top_n)
            for batch in batches:
                on_result(scorer.score(batch))
        else:
            score_in_pool(settings, bundle, batches, top_n, on_result)
        values = {
            "users_scored": totals.lists + totals.cold,
            "cold_users": totals.cold,
            "popularity_deciles": totals.deciles.tolist(),
        }
        if full_run:
            values.update(_drift(db, totals, users_total))
            db.update_run(record.run_id, **values)
            store.publish(
                record.run_id,
                expected_lists=totals.lists,
                grace_seconds=settings.run_grace_seconds,
            )
        duration = time.perf_counter() - clock
        db.update_run(
            record.run_id,
            **values,
            status="published",
            finished_at=datetime.now(UTC),
            duration_seconds=duration,
        )
    except BaseException as exc:
        reason = _reason(exc)
        if full_run:
            try:
                store.discard(record.run_id)
            except StoreUnavailable:
                logger.warning("could not discard run %s (its keys expire)", record.run_id)
        db.update_run(
            record.run_id,
            status="failed",
            finished_at=datetime.now(UTC),
            duration_seconds=time.perf_counter() - clock,
            error=f"{reason}: {exc}",
        )
        if metrics:
            metrics.failures.labels(reason).inc()
            metrics.runs.labels(record.kind, "failed").inc()
        if isinstance(exc, EncoreError | KeyboardInterrupt):
            raise
        raise RunFailed(f"run {record.run_id} failed ({reason}): {exc}") from exc
    if metrics:
        metrics.runs.labels(record.kind, "published").inc()
    logger.info(
        "run %s published: %d lists, %d cold users in %.1f s",
        record.run_id,
        totals.lists,
        totals.cold,
        duration,
    )
    return db.get_run(record.run_id)


def score_in_pool(
    settings: Settings,
    bundle: Bundle,
    batches: list,
    top_n: int,
    on_result: Callable[[BatchResult], None],
) -> None:
    """Score batches in a spawn pool with a bounded number in flight; results as they finish."""
    pool = ProcessPoolExecutor(
        max_workers=settings.workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(str(bundle.path), top_n, settings.torch_threads),
    )
    todo = iter(batches)
    pending: set[Future] = set()

    def submit_next() -> None:
        batch = next(todo, None)
        if batch is not None:
            pending.add(pool.submit(score_batch, batch))

    try:
        for _ in range(settings.resolved_batches_in_flight):
            submit_next()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                pending.discard(future)
                result = future.result()
                submit_next()  # keep the workers busy while this batch is written
                on_result(result)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def fallback_payload(bundle: Bundle, top_n: int) -> bytes:
    """The run's popularity list: its most popular playlists, as JSON bytes."""
    order = np.argsort(-bundle.popularity(), kind="stable")[:top_n]
    return orjson.dumps(np.asarray(bundle.playlist_ids())[order].tolist())


def catalog_names(bundle: Bundle) -> dict[int, str]:
    if bundle.catalog_path is None:
        return {}
    catalog = pd.read_parquet(bundle.catalog_path)
    return dict(zip(catalog["playlist_id"].tolist(), catalog["name"].tolist(), strict=True))


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
    if isinstance(exc, StoreUnavailable):
        return "store_unavailable"
    if isinstance(exc, RunFailed):
        return "verification"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return "error"
