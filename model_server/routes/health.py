"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from encore.errors import EncoreError
from model_server.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Stores reachable and a run published")
async def readyz(state: StateDep) -> JSONResponse:
    problems = []
    for name, check in (("online store", state.reader.ping), ("database", state.database.ping)):
        try:
            await check()
        except EncoreError as exc:
            problems.append(f"{name}: {exc}")
        except Exception as exc:
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
    run_id = None
    if not problems:
        try:
            run_id = (await state.current_run()).run_id
        except EncoreError as exc:
            problems.append(str(exc))
    if problems:
        return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
    return JSONResponse({"status": "ready", "run_id": run_id})
