"""Feedback events: durable before the answer, idempotent by event id."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Response, status

from encore.database import FeedbackConflict, FeedbackEvent
from encore.errors import NoPublishedRun, StoreUnavailable
from model_server import api_metrics as metrics
from model_server.deps import StateDep
from model_server.schemas import FeedbackRequest

logger = logging.getLogger("encore.api.feedback")
router = APIRouter(prefix="/v1/feedback", tags=["feedback"])


async def _model_version(state: StateDep, run_id: str) -> str | None:
    try:
        current = await state.current_run()
        if current.run_id == run_id:
            return current.model_version
    except (NoPublishedRun, StoreUnavailable):
        # The served run is only a shortcut: with the online store down, the run records
        # still name the model, and a like must not be lost to a Redis outage.
        pass
    record = await state.database.get_run(run_id)
    return record.model_version if record else None


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Record a like: 201 when stored, 200 when this event id was already stored",
    responses={
        200: {"description": "This event id was already stored (a retry): nothing written"},
        409: {"description": "This event id is stored for a different event"},
    },
)
async def feedback(body: FeedbackRequest, state: StateDep, response: Response) -> dict:
    try:
        model_version = await _model_version(state, body.run_id)
        event = FeedbackEvent(
            event_id=body.event_id,
            user_id=body.user_id,
            run_id=body.run_id,
            liked_playlist_id=body.liked_playlist_id,
            shown_playlist_ids=body.shown_playlist_ids,
            model_version=model_version,
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
        metrics.FEEDBACK_LIKES.labels(version).inc()
        metrics.FEEDBACK_IMPRESSIONS.labels(version).inc(max(len(body.shown_playlist_ids), 1))
    else:
        metrics.FEEDBACK_EVENTS.labels("duplicate").inc()
        response.status_code = status.HTTP_200_OK
    return {
        "event_id": str(body.event_id),
        "status": "stored" if stored else "duplicate",
        "model_version": model_version,
    }
