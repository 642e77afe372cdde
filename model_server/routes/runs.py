"""Run records, and asking for a run or a backfill (admin).

The API never starts a run itself: it queues a record, which the scheduler claims and runs
under the run lock (`encore scheduler` looks every ENCORE_QUEUE_POLL_SECONDS).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status

from encore.database import RunRecord, new_run_id
from encore.redact import redact
from model_server.deps import AdminDep, StateDep
from model_server.schemas import RunRequest

router = APIRouter(prefix="/v1/runs", tags=["runs"])


def _public(record: RunRecord) -> dict:
    # This route is not authenticated, and a run's error may quote a store URL (records
    # written before errors were redacted at the source, or by another writer).
    data = record.as_json()
    if data["error"]:
        data["error"] = redact(data["error"])
    return data


@router.get("", summary="Recent runs, newest first")
async def list_runs(state: StateDep, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict:
    runs = await state.database.list_runs(limit=limit)
    return {"runs": [_public(run) for run in runs]}


@router.get(
    "/{run_id}",
    summary="One run: status, progress, error",
    responses={404: {"description": "No run has this id"}},
)
async def get_run(run_id: str, state: StateDep) -> dict:
    record = await state.database.get_run(run_id)
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no run {run_id!r}")
    return _public(record)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Queue a run, or a backfill of some users, for the scheduler",
)
async def start_run(body: RunRequest, state: StateDep, _: AdminDep, response: Response) -> dict:
    now = datetime.now(UTC)
    record = RunRecord(new_run_id(now), body.kind, "queued", created_at=now)
    await state.database.enqueue_run(record, getattr(body, "user_ids", None))
    response.headers["Location"] = f"/v1/runs/{record.run_id}"
    return {"run_id": record.run_id, "kind": record.kind, "status": record.status}
