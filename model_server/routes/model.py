"""The model being served, and playlist names for the page."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status

from model_server import metrics
from model_server.deps import SettingsDep, StateDep
from model_server.schemas import MAX_ID

router = APIRouter(prefix="/v1", tags=["model"])


@router.get("/model", summary="The run and model version being served")
async def model(state: StateDep, settings: SettingsDep) -> dict:
    run = await state.current_run()
    metadata_path = settings.bundles_dir / run.model_version / "metadata.json"
    try:
        metadata = json.loads(metadata_path.read_text())
    except (OSError, json.JSONDecodeError):
        metadata = None  # the bundle directory is not mounted on this API replica
    return {
        "model_version": run.model_version,
        "run_id": run.run_id,
        "top_n": run.top_n,
        "published_at": run.published_at,
        "metadata": metadata,
    }


@router.get("/playlists", summary="Names of playlists (up to 200), from the served run")
async def playlists(
    state: StateDep,
    ids: Annotated[str, Query(description="Comma-separated playlist ids", max_length=4000)],
) -> dict:
    try:
        wanted = [int(part) for part in ids.split(",") if part.strip()]
    except ValueError as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"ids must be comma-separated integers: {exc}"
        ) from exc
    # Ids are 64-bit: a larger one would overflow SQLite's INTEGER (a 500, not a 422).
    if not wanted or len(wanted) > 200 or min(wanted) < 0 or max(wanted) > MAX_ID:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"give between 1 and 200 ids, each between 0 and {MAX_ID}",
        )
    run = await state.current_run()
    with metrics.STORE_READ_SECONDS.labels("names").time():
        names = await state.reader.names(run.run_id, wanted)
    return {
        "run_id": run.run_id,
        "playlists": [
            {"playlist_id": pid, "name": name} for pid, name in zip(wanted, names, strict=True)
        ],
    }
