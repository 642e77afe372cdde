"""The model version being served."""

from __future__ import annotations

import json

from fastapi import APIRouter

from model_server.deps import SettingsDep, StateDep

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
        "challenger": run.challenger.as_json() if run.challenger else None,
        "published_at": run.published_at,
        "metadata": metadata,
    }
