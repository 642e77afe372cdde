"""A nightly run's first phases: ingest what is new in ``ENCORE_INTERACTIONS``, add the
feedback page's likes, and rebuild the promoted model's pairings on all of it."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from encore.bundle import Bundle, list_bundles, promoted_bundle, promoted_version
from encore.database import Database
from encore.errors import RunStopped
from encore.settings import Settings
from training.incremental import refresh_incremental
from training.refresh import refresh_bundle
from training.retrain import retrain_due, retrain_with_gate
from training.source import ingest, with_likes

logger = logging.getLogger("encore.scheduler.freshness")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Refreshed versions kept (newest first), besides the promoted and the served one: a new one
# every night, each as large as the pairings.
KEEP_REFRESHED = 3


def refresh_for_night(settings: Settings, db: Database, stop: threading.Event) -> dict[str, float]:
    """Ingest, add likes and refresh the promoted model when its data changed; return the
    seconds of each phase. The refreshed version is promoted (the run then scores it).

    When the champion's ranker is older than ENCORE_RETRAIN_EVERY_DAYS, a new one is trained
    first, behind the quality gate: promoted if it passes, otherwise kept unpromoted (an alert
    fires) and the champion is refreshed as on any other night."""

    assert settings.interactions is not None
    phases: dict[str, float] = {}
    clock = time.perf_counter()
    result = ingest(
        settings.interactions, settings.ingest_dir, columns=settings.interactions_columns
    )
    users, playlists = liked_pairs(db)
    data = with_likes(result.interactions, users, playlists, settings.like_weight)
    phases["ingest"] = round(time.perf_counter() - clock, 3)
    logger.info(
        "ingest: %d new rows from %d partitions, %d set aside, %d likes, %d rows in all",
        result.new_rows,
        len(result.new_partitions),
        len(result.set_aside),
        len(users) if settings.like_weight > 0 else 0,
        len(data),
    )
    if stop.is_set():
        raise RunStopped("stopped on request before the refresh")
    if len(data) == 0:
        logger.warning("nothing admitted from %s yet: no refresh", settings.interactions)
        return phases
    base = promoted_bundle(settings.bundles_dir)
    if base.metadata.get("data_fingerprint") == data.fingerprint:
        logger.info("model %s is already fitted on these interactions", base.version)
        return phases
    experiment = db.get_experiment()
    if experiment is not None and experiment.ended_at is None:
        # Refreshing the champion would end the comparison (a promotion does): both arms keep
        # their versions until the experiment ends.
        logger.warning(
            "experiment %s is running: model %s is not refreshed tonight",
            experiment.experiment_id,
            base.version,
        )
        return phases
    state_dir = settings.ingest_dir.parent
    every = settings.retrain_every_days * 86400
    if retrain_due(base, settings.bundles_dir, state_dir, every):
        clock = time.perf_counter()
        gate = retrain_with_gate(
            data,
            settings.bundles_dir,
            base,
            tolerance=settings.retrain_tolerance,
            state_dir=state_dir,
        )
        phases["retrain"] = round(time.perf_counter() - clock, 3)
        if gate.promoted:  # trained on these very interactions: nothing to refresh
            return phases
    clock = time.perf_counter()
    refreshed = None
    if settings.refresh_mode == "auto" and not _full_refresh_due(base, settings):
        refreshed = refresh_incremental(
            data,
            settings.bundles_dir,
            base,
            state_dir=state_dir,
            max_changed_share=settings.incremental_max_share,
            ray_address=settings.ray_address,
        )
    if refreshed is None:
        refresh_bundle(
            data,
            settings.bundles_dir,
            base,
            ray_address=settings.ray_address,
            state_dir=state_dir,
        )
    phases["refresh" if refreshed is None else "refresh_incremental"] = round(
        time.perf_counter() - clock, 3
    )
    served = db.last_published()
    prune_refreshed(
        settings.bundles_dir,
        keep=KEEP_REFRESHED,
        protect={base.version} | ({served.model_version} if served else set()),
    )
    return phases


def prune_refreshed(bundles_dir: Path, *, keep: int, protect: set[str | None]) -> list[str]:
    """Delete refreshed versions but the newest ``keep``, the promoted one and ``protect``
    (the version the served run scored with: a backfill writes into that run with it).
    Trained versions are never deleted here. Returns the versions deleted."""
    promoted = promoted_version(bundles_dir)
    refreshed = [b for b in list_bundles(bundles_dir) if b.metadata.get("refreshed_from")]
    deleted = []
    for bundle in refreshed[: max(0, len(refreshed) - keep)]:
        if bundle.version in protect or bundle.version == promoted:
            continue
        shutil.rmtree(bundle.path, ignore_errors=True)
        deleted.append(bundle.version)
    if deleted:
        logger.info("deleted %d refreshed versions: %s", len(deleted), ", ".join(deleted))
    return deleted


def _full_refresh_due(base: Bundle, settings: Settings) -> bool:
    last = base.metadata.get("full_refresh_at")
    if last is None:
        return True
    age = datetime.now(UTC) - datetime.fromisoformat(last)
    return age.total_seconds() >= settings.full_refresh_every_days * 86400


def liked_pairs(db: Database) -> tuple[np.ndarray, np.ndarray]:
    """(user_id, playlist_id) of every like recorded through the feedback page."""
    users: list[int] = []
    playlists: list[int] = []
    for chunk in db.feedback_since(EPOCH):
        for event in chunk:
            if event.kind == "like" and event.liked_playlist_id is not None:
                users.append(event.user_id)
                playlists.append(event.liked_playlist_id)
    return np.array(users, dtype=np.int64), np.array(playlists, dtype=np.int64)
