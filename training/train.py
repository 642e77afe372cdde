"""`encore train`: fit the pipeline on all interactions and write a versioned bundle."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from encore.bundle import Bundle, list_bundles, new_version, promote, write_bundle
from encore.progress import Progress
from inference.base import SEEN_DIR
from training.evaluate import Evaluation, evaluate
from training.fit import FittedModel, TrainParams, fit
from training.ingest import Interactions
from training.matrix import encode, merge_repeats


def train_bundle(
    interactions: Interactions,
    bundles_dir: Path,
    params: TrainParams = TrainParams(),
    *,
    catalog: pd.DataFrame | None = None,
    run_evaluation: bool = True,
    promote_bundle: bool = True,
    release_rows: bool = False,
    progress: Progress | None = None,
) -> tuple[Bundle, Evaluation | None]:
    """Fit on every row, optionally evaluate with the protocol, and write the bundle.

    With ``release_rows``, the interactions' rows are dropped once encoded (see
    :meth:`Interactions.release_rows`): the caller must not need them afterwards."""
    evaluation = None
    if run_evaluation:
        evaluation = evaluate(interactions, params, progress=_prefixed(progress, "evaluate: "))
    bundles_dir.mkdir(parents=True, exist_ok=True)
    # The pairings go to disk as they are made (7.5 GB at 10M users), beside the bundles so
    # that they are copied within one file system; list_bundles skips dot directories.
    with tempfile.TemporaryDirectory(prefix=".pairings-", dir=bundles_dir) as spill:
        return _fit_and_write(
            interactions,
            bundles_dir,
            params,
            catalog=catalog,
            evaluation=evaluation,
            promote_bundle=promote_bundle,
            release_rows=release_rows,
            spill=Path(spill),
            progress=progress,
        )


def _fit_and_write(
    interactions: Interactions,
    bundles_dir: Path,
    params: TrainParams,
    *,
    catalog: pd.DataFrame | None,
    evaluation: Evaluation | None,
    promote_bundle: bool,
    release_rows: bool,
    spill: Path,
    progress: Progress | None,
) -> tuple[Bundle, Evaluation | None]:
    clock = time.perf_counter()
    rows = len(interactions)
    users, user_codes = encode(interactions.user_ids)
    items, item_codes = encode(interactions.playlist_ids)
    # As the protocol does: the inner folds split pairs, not the rows that repeat one.
    user_codes, item_codes, weights = merge_repeats(
        user_codes, item_codes, interactions.weights, len(items)
    )
    if release_rows:
        interactions.release_rows()
    fitted = fit(
        user_codes,
        item_codes,
        weights,
        (len(users), len(items)),
        params,
        spill=spill,
        progress=progress,
    )
    del user_codes, item_codes, weights
    seconds = time.perf_counter() - clock

    contents = bundle_contents(fitted, users.ids, items.ids, catalog)

    metadata = {
        "data_fingerprint": interactions.fingerprint,
        "data": {
            "path": str(interactions.path),
            "rows": rows,
            "users": len(users),
            "playlists": len(items),
            "matrix_entries": int(fitted.matrix.nnz),
        },
        "hyperparameters": params.as_dict(),
        "chosen_hyperparameters": fitted.chosen,
        "model": model_spec(fitted),
        "metrics": evaluation.as_dict() if evaluation else {},
        "training": {
            "seconds": round(seconds, 2),
            "stages_seconds": {k: round(v, 2) for k, v in fitted.seconds.items()},
            "final_loss": fitted.final_loss,
            "cold_users": int((fitted.pairings.lengths() == 0).sum()),
            "torch": torch.__version__,
        },
    }
    bundle = write_bundle(
        bundles_dir,
        version=new_version(interactions.fingerprint),
        metadata=metadata,
        write_contents=contents,
    )
    if promote_bundle:
        promote(bundles_dir, bundle.version)
    return bundle, evaluation


def bundle_contents(
    fitted: FittedModel,
    user_ids: np.ndarray,
    playlist_ids: np.ndarray,
    catalog: pd.DataFrame | None = None,
) -> Callable[[Path], None]:
    """What a bundle of ``fitted`` holds besides its metadata, as ``write_bundle`` takes it."""

    def contents(directory: Path) -> None:
        torch.save(fitted.ranker.state_dict(), directory / "weights.pt")
        np.save(directory / "user_ids.npy", user_ids)
        np.save(directory / "playlist_ids.npy", playlist_ids)
        np.save(directory / "popularity.npy", fitted.popularity)
        fitted.pairings.save(directory / "pairings")
        # What each user has seen: the run completes short lists with popular playlists the
        # user has not seen, as the quality protocol does.
        (directory / SEEN_DIR).mkdir()
        np.save(directory / SEEN_DIR / "indptr.npy", fitted.matrix.indptr.astype(np.int64))
        np.save(directory / SEEN_DIR / "items.npy", fitted.matrix.indices.astype(np.int32))
        if catalog is not None:
            known = catalog[catalog["playlist_id"].isin(playlist_ids)]
            known.to_parquet(directory / "catalog.parquet", index=False)

    return contents


def _prefixed(progress: Progress | None, prefix: str) -> Progress | None:
    if progress is None:
        return None
    return lambda stage, *args, **kwargs: progress(prefix + stage, *args, **kwargs)


def model_spec(fitted: FittedModel) -> dict:
    ranker = fitted.ranker
    return {
        "kind": "ranker",
        "class": "inference.ranker.Ranker",
        "format": "torch.save(state_dict), weights_only",
        "n_users": ranker.user_embedding.num_embeddings,
        "n_items": ranker.item_embedding.num_embeddings,
        "dim": ranker.user_embedding.embedding_dim,
        "hidden": list(fitted.params.hidden),
        "neighbours": ranker.neighbours,
        "candidates": ranker.candidates,
        "features": list(ranker.feature_names),
        "popularity_penalty": ranker.popularity_penalty,
        "item_model": None if fitted.item_model is None else fitted.item_model.method,
    }


def find_bundle_for(
    bundles_dir: Path, fingerprint: str, hyperparameters: dict | None = None
) -> Bundle | None:
    """The newest bundle trained on data with this fingerprint (and, when given, with these
    hyper-parameters: an evaluation's figures describe only such a bundle)."""
    matches = [
        b
        for b in list_bundles(bundles_dir)
        if b.metadata.get("data_fingerprint") == fingerprint
        and (hyperparameters is None or _same(b.metadata.get("hyperparameters"), hyperparameters))
    ]
    return matches[-1] if matches else None


def _same(stored: dict | None, wanted: dict) -> bool:
    # Where the pairing's search ran does not change what it finds (tests/test_ray_engine.py).
    where = {"pairing_engine"}
    if stored is None:
        return False
    return {k: v for k, v in stored.items() if k not in where} == {
        k: v for k, v in wanted.items() if k not in where
    }
