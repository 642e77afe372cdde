"""Retraining behind a quality gate: a new ranker is promoted only if, measured with the quality
protocol on the latest data, its recall@10 is not below the champion's by more than a tolerance.

Both are measured on the same split of the same data: the challenger trained on its training
rows as `encore evaluate` does, the champion's trained ranker installed over tables and
pairings fitted on those rows (what a refresh would serve). A refused challenger is kept, not
promoted; the outcome is written to ``ENCORE_HOME/state/retrain.json`` for the metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from encore.bundle import Bundle, open_bundle, promote
from encore.errors import BundleError
from encore.progress import Progress
from training.evaluate import evaluate
from training.fit import FittedModel, TrainParams, fit_serving
from training.ingest import Interactions
from training.refresh import base_params, trained_ranker
from training.train import train_bundle

logger = logging.getLogger("encore.retrain")

GATE_FILE = "retrain.json"


@dataclass(frozen=True)
class GateResult:
    challenger: Bundle
    champion_version: str
    champion_recall: float
    challenger_recall: float
    tolerance: float
    promoted: bool
    seconds: float

    def as_dict(self) -> dict:
        return {
            "at": time.time(),
            "challenger": self.challenger.version,
            "champion": self.champion_version,
            "champion_recall@10": round(self.champion_recall, 5),
            "challenger_recall@10": round(self.challenger_recall, 5),
            "tolerance": self.tolerance,
            "promoted": self.promoted,
            "seconds": round(self.seconds, 2),
        }


def retrain_params(champion: Bundle) -> TrainParams:
    """The champion's hyper-parameters, with what it chose on its inner split chosen again."""
    params = base_params(champion)
    stored = champion.metadata.get("hyperparameters") or {}
    return dataclasses.replace(
        params,
        ease_lambda=stored.get("ease_lambda"),
        ease_dropout=stored.get("ease_dropout"),
        popularity_penalty=stored.get("popularity_penalty"),
    )


def passes(challenger_recall: float, champion_recall: float, tolerance: float) -> bool:
    """The gate: at most ``tolerance`` (a share, 0.02 = 2 %) below the champion's recall."""
    return challenger_recall >= champion_recall * (1.0 - tolerance)


def retrain_with_gate(
    interactions: Interactions,
    bundles_dir: Path,
    champion: Bundle,
    *,
    tolerance: float,
    state_dir: Path,
    params: TrainParams | None = None,
    progress: Progress | None = None,
) -> GateResult:
    """Train a challenger on ``interactions``, measure both, promote the challenger if it
    passes the gate; the challenger bundle is written either way."""
    clock = time.perf_counter()
    params = params or retrain_params(champion)
    challenger_eval = evaluate(interactions, params, progress=progress)

    def champion_fit(
        user_codes: np.ndarray, item_codes: np.ndarray, weights: np.ndarray, shape: tuple[int, int]
    ) -> FittedModel:
        fixed = base_params(champion)
        ranker = trained_ranker(champion, shape)
        return fit_serving(user_codes, item_codes, weights, shape, fixed, ranker, fixed.items)

    champion_eval = evaluate(interactions, params, fitter=champion_fit)
    bundle, _ = train_bundle(
        interactions, bundles_dir, params, run_evaluation=False, promote_bundle=False
    )
    metrics = challenger_eval.as_dict()
    metrics["gate"] = {
        "champion": champion.version,
        "champion_recall@10": round(champion_eval.model.recall_at_10, 5),
        "tolerance": tolerance,
    }
    bundle.update_metrics(metrics)
    ok = passes(challenger_eval.model.recall_at_10, champion_eval.model.recall_at_10, tolerance)
    if ok:
        promote(bundles_dir, bundle.version)
    result = GateResult(
        bundle,
        champion.version,
        champion_eval.model.recall_at_10,
        challenger_eval.model.recall_at_10,
        tolerance,
        ok,
        time.perf_counter() - clock,
    )
    log = logger.info if ok else logger.error
    log(
        "retrained %s: recall@10 %.4f against the champion %s's %.4f on the same data "
        "(tolerance %.1f %%): %s",
        bundle.version,
        result.challenger_recall,
        champion.version,
        result.champion_recall,
        100 * tolerance,
        "promoted" if ok else "refused, kept unpromoted",
    )
    write_gate_result(state_dir, result)
    return result


def write_gate_result(state_dir: Path, result: GateResult) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    partial = state_dir / f".{GATE_FILE}.partial"
    partial.write_text(json.dumps(result.as_dict(), indent=1))
    os.replace(partial, state_dir / GATE_FILE)


def record_failed_retrain(state_dir: Path, champion: str, error: Exception) -> None:
    """A retraining that did not finish counts as refused (the alert fires) until the next."""
    state_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "at": time.time(),
        "challenger": None,
        "champion": champion,
        "champion_recall@10": 0.0,
        "challenger_recall@10": 0.0,
        "promoted": False,
        "error": str(error)[:500],
    }
    partial = state_dir / f".{GATE_FILE}.partial"
    partial.write_text(json.dumps(payload, indent=1))
    os.replace(partial, state_dir / GATE_FILE)


def read_gate_result(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / GATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def retrain_due(bundle: Bundle, bundles_dir: Path, state_dir: Path, every_seconds: float) -> bool:
    """Whether the champion's ranker (or the last gate's attempt) is older than the period."""
    if every_seconds <= 0:
        return False
    trained = last_trained_at(bundle, bundles_dir) or 0.0
    tried = (read_gate_result(state_dir) or {}).get("at", 0.0)
    return time.time() - max(trained, tried) >= every_seconds


def last_trained_at(bundle: Bundle, bundles_dir: Path) -> float | None:
    """When the ranker of ``bundle`` was trained (a refreshed version's base), Unix seconds."""
    origin = bundle.metadata.get("refreshed_from")
    if origin:
        try:
            bundle = open_bundle(bundles_dir, origin)
        except BundleError:
            return None
    created = bundle.metadata.get("created_at")
    return datetime.fromisoformat(created).timestamp() if created else None
