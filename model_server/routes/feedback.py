"""Feedback events: durable before the answer, idempotent by event id."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Response, status

from encore.database import FeedbackConflict, FeedbackEvent
from encore.errors import NoPublishedRun, StoreUnavailable
from encore.experiments import Assignment, Challenger
from model_server import api_metrics as metrics
from model_server.deps import StateDep
from model_server.schemas import FeedbackRequest

logger = logging.getLogger("encore.api.feedback")
router = APIRouter(prefix="/v1/feedback", tags=["feedback"])


async def _attribution(state: StateDep, run_id: str, user_id: int) -> tuple[str | None, str | None]:
    """The model version that chose the user's list in that run, and the run's experiment:
    derived here from the run and the user, never taken from the client."""
    try:
        current = await state.current_run()
        if current.run_id == run_id:
            arm = current.challenger
            return current.version_of(user_id), arm.experiment_id if arm else None
    except (NoPublishedRun, StoreUnavailable):
        # The served run is only a shortcut: with the online store down, the run records
        # still name the model, and a like must not be lost to a Redis outage.
        pass
    record = await state.database.get_run(run_id)
    if record is None:
        return None, None
    if record.target_run_id:  # a backfill's lists belong to the run it wrote into
        record = await state.database.get_run(record.target_run_id) or record
    if not (record.experiment_id and record.challenger_version and record.challenger_share):
        return record.model_version, None
    arm = Challenger(record.experiment_id, record.challenger_version, record.challenger_share)
    return Assignment(arm).version_of(user_id, record.model_version or ""), arm.experiment_id


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Record a like or a view: 201 when stored, 200 when this event id was already stored",
    responses={
        200: {"description": "This event id was already stored (a retry): nothing written"},
        409: {"description": "This event id is stored for a different event"},
    },
)
async def feedback(body: FeedbackRequest, state: StateDep, response: Response) -> dict:
    try:
        model_version, experiment_id = await _attribution(state, body.run_id, body.user_id)
        event = FeedbackEvent(
            event_id=body.event_id,
            user_id=body.user_id,
            run_id=body.run_id,
            liked_playlist_id=body.liked_playlist_id,
            shown_playlist_ids=body.shown_playlist_ids,
            model_version=model_version,
            kind=body.kind,
            experiment_id=experiment_id,
        )
        stored = await state.database.insert_feedback(event)
    except StoreUnavailable:
        metrics.FEEDBACK_EVENTS.labels("failed").inc()
        raise
    except FeedbackConflict as exc:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"event_id {exc} is already stored for a different event; use a new event id",
        ) from exc
    if stored:
        metrics.FEEDBACK_EVENTS.labels("stored").inc()
        version = model_version or "unknown"
        if body.kind == "view":
            metrics.FEEDBACK_VIEWS.labels(version).inc()
        else:
            metrics.FEEDBACK_LIKES.labels(version).inc()
            metrics.FEEDBACK_IMPRESSIONS.labels(version).inc(max(len(body.shown_playlist_ids), 1))
    else:
        metrics.FEEDBACK_EVENTS.labels("duplicate").inc()
        response.status_code = status.HTTP_200_OK
    return {
        "event_id": str(body.event_id),
        "kind": body.kind,
        "status": "stored" if stored else "duplicate",
        "model_version": model_version,
        "experiment_id": experiment_id,
    }
