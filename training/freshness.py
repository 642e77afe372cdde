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
from training.retrain import record_failed_retrain, retrain_due, retrain_with_gate
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
    if base.metadata.get("model", {}).get("kind", "ranker") != "ranker":
        logger.warning(
            "model %s is an exported program: its pairings cannot be refreshed; it scores the "
            "pairings it came with",
            base.version,
        )
        return phases
    state_dir = settings.ingest_dir.parent
    every = settings.retrain_every_days * 86400
    if retrain_due(base, settings.bundles_dir, state_dir, every):
        clock = time.perf_counter()
        try:
            gate = retrain_with_gate(
                data,
                settings.bundles_dir,
                base,
                tolerance=settings.retrain_tolerance,
                state_dir=state_dir,
            )
        except Exception as exc:
            # The night still publishes (the champion, refreshed below); the attempt is
            # recorded as refused so that it is not retried before the next period.
            logger.exception("retraining failed: %s", exc)
            record_failed_retrain(state_dir, base.version, exc)
        else:
            if gate.promoted:  # trained on these very interactions: nothing to refresh
                phases["retrain"] = round(time.perf_counter() - clock, 3)
                return phases
        phases["retrain"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    try:
        phase = _refresh(settings, data, base, state_dir)
    except (RunStopped, KeyboardInterrupt):
        raise
    except Exception as exc:
        # A failed refresh must not cost the night: the promoted model scores as it is.
        logger.exception("refreshing model %s failed, scoring it as it is: %s", base.version, exc)
        return phases
    phases[phase] = round(time.perf_counter() - clock, 3)
    prune_refreshed(
        settings.bundles_dir, keep=KEEP_REFRESHED, protect=_in_use(db, settings) | {base.version}
    )
    return phases


def _in_use(db: Database, settings: Settings) -> set[str | None]:
    """Versions a run still readable may need: a backfill into it, or a rollback to it, scores
    with the version it was published with."""
    horizon = datetime.now(UTC).timestamp() - settings.run_grace_seconds
    versions: set[str | None] = set()
    for run in db.list_runs(limit=1000):
        finished = run.finished_at.timestamp() if run.finished_at else float("inf")
        if finished >= horizon or run.status in ("queued", "running", "publishing"):
            versions.add(run.model_version)
            versions.update((run.users_by_version or {}).keys())
    return versions


def _refresh(settings: Settings, data, base: Bundle, state_dir: Path) -> str:
    """An incremental refresh when possible and cheaper, else a full one; returns the phase."""
    if settings.refresh_mode == "auto" and not _full_refresh_due(base, settings):
        refreshed = refresh_incremental(
            data,
            settings.bundles_dir,
            base,
            state_dir=state_dir,
            max_changed_share=settings.incremental_max_share,
            ray_address=settings.ray_address,
        )
        if refreshed is not None:
            return "refresh_incremental"
    refresh_bundle(
        data, settings.bundles_dir, base, ray_address=settings.ray_address, state_dir=state_dir
    )
    return "refresh"


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
