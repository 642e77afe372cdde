"""The nightly refresh: a trained ranker's pairings, candidates and tables rebuilt from the
latest interactions, written as a new model version.

Only the ranker's learnt part (its layers and feature scaling) is kept: it scores features
(neighbour support, item-model score, popularity, activity, the factors' dot product) that mean
the same on new data, so new users, new playlists and new listening reach the lists without
retraining. Retraining runs on its own, slower schedule.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from encore.bundle import Bundle, new_version, promote, write_bundle
from encore.errors import EncoreError
from encore.progress import Progress
from inference.ranker import Ranker, ranker_from_spec
from training.fit import TrainParams, fit_serving
from training.ingest import Interactions
from training.item_state import save_item_model
from training.matrix import encode, merge_repeats
from training.train import bundle_contents, model_spec

logger = logging.getLogger("encore.refresh")

# The ranker's tables belong to the data; everything else in its state dict is learnt.
TABLE_KEYS = (
    "user_embedding.weight",
    "item_embedding.weight",
    "user_log_activity",
    "item_log_popularity",
)


def base_params(base: Bundle) -> TrainParams:
    """The hyper-parameters ``base`` was trained with, its choices (λ, dropout, penalty) fixed."""
    stored = dict(base.metadata.get("hyperparameters") or {})
    known = {f.name for f in dataclasses.fields(TrainParams)}
    values = {k: v for k, v in stored.items() if k in known}
    if "hidden" in values:
        values["hidden"] = tuple(values["hidden"])
    # Trained before the item model weighted a user's row: its ranker learnt on 0/1 rows.
    values.setdefault("item_weighted_rows", False)
    chosen = base.metadata.get("chosen_hyperparameters") or {}
    if "ease_lambda" in chosen:
        values["ease_lambda"] = chosen["ease_lambda"]
        # Chosen before EDLAE's dropout was: its item model was plain EASE.
        values["ease_dropout"] = chosen.get("ease_dropout", 0.0)
    return TrainParams(**values)


def trained_ranker(base: Bundle, shape: tuple[int, int]) -> Ranker:
    """``base``'s trained ranker (its layers and feature scaling) with empty tables of
    ``shape`` (users, playlists), for ``fit_serving`` to fill."""
    spec = base.metadata.get("model", {})
    if spec.get("kind", "ranker") != "ranker":
        raise EncoreError(
            f"model {base.version} is an exported program: its tables cannot be rebuilt "
            "(train a new one, or import one trained on the latest data)"
        )
    ranker = ranker_from_spec(spec, *shape)
    learnt = {k: v for k, v in base.load_state_dict().items() if k not in TABLE_KEYS}
    missing, unexpected = ranker.load_state_dict(learnt, strict=False)
    if unexpected or set(missing) - set(TABLE_KEYS):
        raise EncoreError(f"model {base.version}'s weights do not fit its spec: {missing}")
    return ranker


def refresh_bundle(
    interactions: Interactions,
    bundles_dir: Path,
    base: Bundle,
    *,
    promote_bundle: bool = True,
    ray_address: str | None = None,
    state_dir: Path | None = None,
    progress: Progress | None = None,
) -> Bundle:
    """A new version of ``base``'s ranker over ``interactions``; promoted unless told not to.
    With ``state_dir``, its item model is kept there for the next incremental refresh."""
    clock = time.perf_counter()
    params = dataclasses.replace(base_params(base), ray_address=ray_address)
    users, user_codes = encode(interactions.user_ids)
    items, item_codes = encode(interactions.playlist_ids)
    user_codes, item_codes, weights = merge_repeats(
        user_codes, item_codes, interactions.weights, len(items)
    )
    shape = (len(users), len(items))
    ranker = trained_ranker(base, shape)
    with tempfile.TemporaryDirectory(prefix=".pairings-", dir=bundles_dir) as spill:
        fitted = fit_serving(
            user_codes,
            item_codes,
            weights,
            shape,
            params,
            ranker,
            params.items,
            spill=Path(spill),
            progress=progress,
        )
        fitted.chosen = base.metadata.get("chosen_hyperparameters") or {}
        del user_codes, item_codes, weights
        catalog = pd.read_parquet(base.catalog_path) if base.catalog_path else None
        metadata = {
            "data_fingerprint": interactions.fingerprint,
            "data": {
                "path": str(interactions.path),
                "rows": len(interactions),
                "users": len(users),
                "playlists": len(items),
                "matrix_entries": int(fitted.matrix.nnz),
            },
            "hyperparameters": base.metadata.get("hyperparameters", {}),
            "chosen_hyperparameters": fitted.chosen,
            "model": model_spec(fitted),
            # Measured on the base's data: this version's ranker is the base's.
            "metrics": {},
            "refreshed_from": base.metadata.get("refreshed_from") or base.version,
            "full_refresh_at": datetime.now(UTC).isoformat(),
            "training": {
                "kind": "refresh",
                "seconds": round(time.perf_counter() - clock, 2),
                "stages_seconds": {k: round(v, 2) for k, v in fitted.seconds.items()},
                "cold_users": int((fitted.pairings.lengths() == 0).sum()),
            },
        }
        bundle = write_bundle(
            bundles_dir,
            version=new_version(interactions.fingerprint),
            metadata=metadata,
            write_contents=bundle_contents(fitted, users.ids, items.ids, catalog),
        )
    if state_dir is not None:
        save_item_model(state_dir, fitted.item_model, bundle.version)
    if promote_bundle:
        promote(bundles_dir, bundle.version)
    logger.info("refreshed %s as %s: %d users, %d playlists", base.version, bundle.version, *shape)
    return bundle
