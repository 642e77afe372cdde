"""Liveness and readiness.

``/readyz`` is for a load balancer: 200 means "send me traffic", 503 "take me out". It is
200 while this replica can serve recommendations (the online store answers and a run is
published), even when the database is down: feedback then answers 503 on every replica
alike, and taking them all out of rotation would stop recommendations too. The body says
which component is down (``"status": "degraded"``) for people and alerts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from encore.errors import StoreUnavailable
from model_server.deps import StateDep
from model_server.errors import outages

router = APIRouter(tags=["health"])

# Each check's budget; they run concurrently, so /readyz answers within about this long,
# well inside a probe's usual 1 s timeout.
CHECK_SECONDS = 0.4


class Check(BaseModel):
    ok: bool
    seconds: float = Field(description="How long the check took.")
    detail: str | None = Field(None, description="What is wrong, when something is.")


class Readiness(BaseModel):
    status: Literal["ready", "degraded", "unavailable"] = Field(
        description="ready: all is well; degraded: recommendations are served but feedback "
        "and run records are not (the database is down); unavailable: not serving."
    )
    run_id: str | None = Field(description="The published run, as the online store has it.")
    checks: dict[str, Check] = Field(
        description="online_store (reads the published run) and database, each with its own "
        "timeout."
    )
    problems: list[str] = Field(description="One sentence per thing that is wrong.")


async def _check(probe: Callable[[], Awaitable[object]]) -> tuple[Check, object]:
    started = time.perf_counter()
    value = None
    try:
        async with asyncio.timeout(CHECK_SECONDS):
            value = await probe()
    except TimeoutError:
        detail = f"no answer within {CHECK_SECONDS} s"
    except StoreUnavailable as exc:
        # The store's own message (URL, driver error) is for the log, not for the probe.
        outages.warn(exc.component or "store", "GET /readyz", exc)
        detail = "unavailable"
    else:
        detail = None
    seconds = round(time.perf_counter() - started, 4)
    return Check(ok=detail is None, seconds=seconds, detail=detail), value


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Ready for traffic: the online store answers and a run is published",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready: take it out of rotation"}},
)
async def readyz(state: StateDep) -> JSONResponse:
    (online, run), (database, _) = await asyncio.gather(
        # A read, not a PING: a replica cut off from its master answers PING but not GET.
        _check(state.reader.current),
        # A shorter wait for a connection than the check's: a pool timeout says "down".
        _check(lambda: state.database.ping(timeout_seconds=CHECK_SECONDS * 0.75)),
    )
    checks = {"online_store": online, "database": database}
    problems = [f"{name.replace('_', ' ')}: {c.detail}" for name, c in checks.items() if not c.ok]
    if online.ok and run is None:
        problems.append("no run has been published yet: run `encore run`")
    serving = online.ok and run is not None
    status = "unavailable" if not serving else "ready" if database.ok else "degraded"
    report = Readiness(
        status=status,
        run_id=run.run_id if run is not None else None,
        checks=checks,
        problems=problems,
    )
    return JSONResponse(report.model_dump(), status_code=200 if serving else 503)
