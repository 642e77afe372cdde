"""Playlist names for the page, from the served run."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query

from model_server import api_metrics as metrics
from model_server.deps import StateDep
from model_server.errors import invalid
from model_server.schemas import MAX_ID

router = APIRouter(prefix="/v1", tags=["playlists"])

MAX_NAMES = 200
DIGITS = re.compile(r"[0-9]+")


def _parse_ids(raw: str) -> list[int]:
    parts = raw.split(",") if raw else []
    if not parts:
        raise invalid(
            ("query", "ids"), "give at least one playlist id", kind="too_short", value=raw
        )
    if len(parts) > MAX_NAMES:
        raise invalid(
            ("query", "ids"),
            f"give at most {MAX_NAMES} playlist ids; got {len(parts)}",
            kind="too_long",
            value=raw,
            max_length=MAX_NAMES,
        )
    ids = []
    for index, part in enumerate(parts):
        # Digits only: int() would also take " 7", "+7" and "7_0", which the schema does not.
        if not DIGITS.fullmatch(part):
            raise invalid(
                ("query", "ids", index),
                f"ids must be comma-separated integers; {part!r} is not one",
                kind="int_parsing",
                value=part,
            )
        # 64-bit: a larger id would overflow SQLite's INTEGER (a 500, not a 422). The length
        # first: int() refuses (ValueError) strings of more than 4300 digits.
        digits = part.lstrip("0") or "0"
        if len(digits) > len(str(MAX_ID)) or int(digits) > MAX_ID:
            raise invalid(
                ("query", "ids", index),
                f"ids must be between 0 and {MAX_ID}",
                kind="less_than_equal",
                value=part,
                le=MAX_ID,
            )
        ids.append(int(digits))
    return ids


@router.get(
    "/playlists",
    summary=f"Names of playlists (up to {MAX_NAMES}), from the served run",
    # FastAPI reads a comma-separated list as one string; the schema says what it holds.
    openapi_extra={
        "parameters": [
            {
                "name": "ids",
                "in": "query",
                "required": True,
                "style": "form",
                "explode": False,
                "description": "Playlist ids, comma-separated: ids=31,4",
                "schema": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_NAMES,
                    "items": {
                        "type": "integer",
                        "format": "int64",
                        "minimum": 0,
                        "maximum": MAX_ID,
                    },
                },
            }
        ]
    },
)
async def playlists(state: StateDep, ids: Annotated[str, Query(include_in_schema=False)]) -> dict:
    wanted = _parse_ids(ids)
    run = await state.current_run()
    with metrics.STORE_READ_SECONDS.labels("names").time():
        names = await state.reader.names(run.run_id, wanted)
    return {
        "run_id": run.run_id,
        "playlists": [
            {"playlist_id": pid, "name": name} for pid, name in zip(wanted, names, strict=True)
        ],
    }
