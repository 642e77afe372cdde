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

from encore.errors import NoPublishedRun, StoreUnavailable
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
    run_id: str | None = Field(description="The run being served, when one is known.")
    checks: dict[str, Check] = Field(
        description="online_store, database and published_run, each with its own timeout."
    )
    problems: list[str] = Field(description="One sentence per failed check.")


async def _check(probe: Callable[[], Awaitable[object]]) -> tuple[Check, object]:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(CHECK_SECONDS):
            value = await probe()
    except TimeoutError:
        detail, value = f"no answer within {CHECK_SECONDS} s", None
    except NoPublishedRun as exc:
        detail, value = str(exc), None
    except StoreUnavailable as exc:
        # The store's own message (URL, driver error) is for the log, not for the probe.
        outages.warn(exc.component or "store", "GET /readyz", exc)
        detail, value = "unavailable", None
    else:
        detail = None
    return Check(
        ok=detail is None, seconds=round(time.perf_counter() - started, 4), detail=detail
    ), value


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
    (online, _), (database, _), (run, current) = await asyncio.gather(
        _check(state.reader.ping),
        # A shorter wait for a connection than the check's: a pool timeout says "down".
        _check(lambda: state.database.ping(timeout_seconds=CHECK_SECONDS * 0.75)),
        _check(state.current_run),
    )
    checks = {"online_store": online, "database": database, "published_run": run}
    problems = [f"{name.replace('_', ' ')}: {c.detail}" for name, c in checks.items() if not c.ok]
    serving = online.ok and run.ok
    status = "unavailable" if not serving else "ready" if database.ok else "degraded"
    report = Readiness(
        status=status,
        run_id=current.run_id if current is not None else None,
        checks=checks,
        problems=problems,
    )
    return JSONResponse(report.model_dump(), status_code=200 if serving else 503)
