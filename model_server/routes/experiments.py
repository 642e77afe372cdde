"""The current experiment's report: the same numbers as `encore experiments report --json`."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from encore.experiment_report import report
from model_server import api_metrics as metrics
from model_server.deps import StateDep

router = APIRouter(prefix="/v1/experiments", tags=["experiments"])


@router.get(
    "/current",
    summary="The running experiment: like rates per version, their difference and p-value",
    responses={404: {"description": "No experiment is running"}},
)
async def current_experiment(state: StateDep) -> dict:
    experiment = await state.database.get_experiment()
    if experiment is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            "no experiment is running: `encore models challenge VERSION --share 0.1` starts one",
        )
    result = report(experiment, await state.database.experiment_counts(experiment.experiment_id))
    metrics.record_experiment(result)
    return result
