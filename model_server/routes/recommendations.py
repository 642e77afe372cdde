"""Recommendations: the stored JSON bytes of each list are copied into the response."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, Path, Query, Response

from encore.online import RunInfo, truncate
from encore.settings import Settings
from model_server import api_metrics as metrics
from model_server.deps import StateDep
from model_server.errors import invalid
from model_server.schemas import MAX_ID, RecommendationsRequest

router = APIRouter(prefix="/v1/recommendations", tags=["recommendations"])

DEFAULT_N = 10
ITEM = b'{"user_id":%d,"playlist_ids":%s,"source":"%s","model_version":%s}'


def _check_n(n: int | None, run: RunInfo, settings: Settings, *, where: str) -> int:
    # The most asked for is what both the run stores and the schema documents (ENCORE_TOP_N).
    most = min(run.top_n, settings.top_n)
    n = min(DEFAULT_N, most) if n is None else n
    if n > most:
        raise invalid(
            (where, "n"),
            f"n must be between 1 and {most} (the lists stored by run {run.run_id}); got {n}",
            kind="less_than_equal",
            value=n,
            le=most,
        )
    return n


async def _items(state: StateDep, run: RunInfo, user_ids: list[int], n: int) -> list[bytes]:
    with metrics.STORE_READ_SECONDS.labels("recommendations").time():
        stored = await state.reader.read(run.run_id, user_ids)
    cut = n < run.top_n
    fallback = truncate(run.fallback, n) if cut else run.fallback
    versions = _versions(run, user_ids)
    items = []
    misses = 0
    for user_id, payload, version in zip(user_ids, stored, versions, strict=True):
        if payload is None:
            misses += 1
            items.append(ITEM % (user_id, fallback, b"fallback", version))
        else:
            list_bytes = truncate(payload, n) if cut else payload
            items.append(ITEM % (user_id, list_bytes, b"batch", version))
    if misses:
        metrics.USERS_SERVED.labels("fallback").inc(misses)
        metrics.COLD_USERS.inc(misses)
    if misses < len(user_ids):
        metrics.USERS_SERVED.labels("batch").inc(len(user_ids) - misses)
    return items


def _versions(run: RunInfo, user_ids: list[int]) -> list[bytes]:
    """Each user's model version as JSON bytes: the version of the arm the user is in (whose
    list, or whose fallback, the run stored for it)."""
    champion = orjson.dumps(run.model_version)
    if run.challenger is None:
        return [champion] * len(user_ids)
    challenger = orjson.dumps(run.challenger.version)
    return [challenger if theirs else champion for theirs in run.assignment.in_arm(user_ids)]


def _head(run: RunInfo) -> bytes:
    return b'{"run_id":"%s","model_version":"%s"' % (
        run.run_id.encode(),
        run.model_version.encode(),
    )


@router.post("", summary="Lists for up to 1000 users, in the order asked")
async def recommendations(body: RecommendationsRequest, state: StateDep) -> Response:
    run = await state.current_run()
    n = _check_n(body.n, run, state.settings, where="body")
    items = await _items(state, run, body.user_ids, n)
    content = _head(run) + b',"recommendations":[' + b",".join(items) + b"]}"
    return Response(content, media_type="application/json")


@router.get("/{user_id}", summary="One user's list")
async def recommendation(
    user_id: Annotated[int, Path(ge=0, le=MAX_ID, json_schema_extra={"format": "int64"})],
    state: StateDep,
    n: Annotated[int | None, Query(ge=1)] = None,
) -> Response:
    run = await state.current_run()
    count = _check_n(n, run, state.settings, where="query")
    (item,) = await _items(state, run, [user_id], count)
    # The element's own model_version (the version that chose this list) is the answer's.
    head = b'{"run_id":%s,' % orjson.dumps(run.run_id)
    return Response(head + item[1:], media_type="application/json")
