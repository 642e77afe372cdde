"""The incremental refresh: only the users with new activity get new neighbours and candidates.

A full refresh rebuilds everything (factors, item model, every user's pairing). When a night
brings a little new data, most users' rows have not changed: their candidates, their factors
and the item model are kept from the previous version, with ids renumbered; the users whose
rows changed (and the new ones) are folded into the previous factors (``u = x V``, the
projection the factorization itself makes) and paired again, against every user. Activity and
popularity tables are recomputed for all. A full refresh still runs on a setting (and when the
kept state is missing), since kept parts drift slowly from what a full one would give.

The item model of the last refresh is kept under ``state_dir`` (``ENCORE_HOME/state/
item_model``), with the model version it belongs to.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from encore.bundle import Bundle, new_version, promote, write_bundle
from inference.base import SEEN_DIR
from training.fit import FittedModel
from training.ingest import Interactions
from training.item_state import load_item_model, save_item_model
from training.items import ItemModel
from training.matrix import (
    activity,
    encode,
    interaction_matrix,
    merge_repeats,
    popularity,
    row_normalize,
)
from training.pairing import Pairings, pair_users
from training.refresh import base_params, trained_ranker
from training.train import bundle_contents, model_spec

logger = logging.getLogger("encore.refresh")


def refresh_incremental(
    interactions: Interactions,
    bundles_dir: Path,
    base: Bundle,
    *,
    state_dir: Path,
    max_changed_share: float,
    ray_address: str | None = None,
) -> Bundle | None:
    """A new version of ``base`` where only the users whose rows changed are paired again;
    None when that is not possible or not cheaper (the caller refreshes in full)."""
    clock = time.perf_counter()
    found, item_model = load_item_model(state_dir, base.version)
    if not found or not (base.path / SEEN_DIR / "indptr.npy").exists():
        return None
    params = base_params(base)
    users, user_codes = encode(interactions.user_ids)
    items, item_codes = encode(interactions.playlist_ids)
    user_codes, item_codes, weights = merge_repeats(
        user_codes, item_codes, interactions.weights, len(items)
    )
    shape = (len(users), len(items))
    old_users, old_items = base.user_ids(), base.playlist_ids()
    user_map = np.searchsorted(users.ids, old_users)
    item_map = np.searchsorted(items.ids, old_items)
    if not (
        np.array_equal(users.ids[np.minimum(user_map, shape[0] - 1)], old_users)
        and np.array_equal(items.ids[np.minimum(item_map, shape[1] - 1)], old_items)
    ):
        logger.info("users or playlists left the data since %s: full refresh", base.version)
        return None
    matrix = interaction_matrix(user_codes, item_codes, weights, shape)
    del user_codes, item_codes, weights
    changed = _changed_users(matrix, base, user_map, item_map)
    if len(changed) > max_changed_share * shape[0]:
        logger.info(
            "%d of %d users changed (more than %.0f %%): full refresh",
            len(changed),
            shape[0],
            100 * max_changed_share,
        )
        return None

    ranker = trained_ranker(base, shape)
    old_state = base.load_state_dict()
    dim = old_state["item_embedding.weight"].shape[1]
    item_factors = np.zeros((shape[1], dim), dtype=np.float32)
    item_factors[item_map] = old_state["item_embedding.weight"].float().numpy()
    user_factors = np.zeros((shape[0], dim), dtype=np.float32)
    user_factors[user_map] = old_state["user_embedding.weight"].float().numpy()
    del old_state
    pop = popularity(matrix)
    user_factors[changed] = _fold_in(matrix[changed], pop, item_factors, params)

    model = _renumbered(item_model, item_map, shape[1])
    pairing = dataclasses.replace(params, ray_address=ray_address).pairing
    fresh = pair_users(matrix, pairing, user_factors=user_factors, rows=changed, item_model=model)
    pairs = _merged(Pairings.load(base.pairings_dir), user_map, item_map, shape[0], changed, fresh)
    ranker.set_tables(user_factors, item_factors, activity(matrix), pop)
    ranker.eval()
    fitted = FittedModel(ranker, pairs, matrix, pop, params, model)
    fitted.chosen = base.metadata.get("chosen_hyperparameters") or {}
    seconds = time.perf_counter() - clock
    catalog = _catalog(base)
    metadata = {
        "data_fingerprint": interactions.fingerprint,
        "data": {
            "path": str(interactions.path),
            "rows": len(interactions),
            "users": shape[0],
            "playlists": shape[1],
            "matrix_entries": int(matrix.nnz),
        },
        "hyperparameters": base.metadata.get("hyperparameters", {}),
        "chosen_hyperparameters": fitted.chosen,
        "model": model_spec(fitted),
        "metrics": {},
        "refreshed_from": base.metadata.get("refreshed_from") or base.version,
        "full_refresh_at": base.metadata.get("full_refresh_at"),
        "training": {
            "kind": "incremental refresh",
            "seconds": round(seconds, 2),
            "users_paired": len(changed),
            "cold_users": int((pairs.lengths() == 0).sum()),
        },
    }
    bundle = write_bundle(
        bundles_dir,
        version=new_version(interactions.fingerprint),
        metadata=metadata,
        write_contents=bundle_contents(fitted, users.ids, items.ids, catalog),
    )
    save_item_model(state_dir, model, bundle.version)
    promote(bundles_dir, bundle.version)
    logger.info(
        "refreshed %s as %s incrementally: %d of %d users paired again in %.1f s",
        base.version,
        bundle.version,
        len(changed),
        shape[0],
        seconds,
    )
    return bundle


def _changed_users(
    matrix: sp.csr_matrix, base: Bundle, user_map: np.ndarray, item_map: np.ndarray
) -> np.ndarray:
    """Users whose set of playlists differs from the one ``base`` was fitted on (new ones
    included), as sorted codes of ``matrix``."""
    indptr = np.load(base.path / SEEN_DIR / "indptr.npy")
    seen = np.load(base.path / SEEN_DIR / "items.npy")
    rows = np.repeat(user_map, np.diff(indptr))
    before = sp.csr_matrix(
        (np.ones(len(seen), dtype=np.int8), (rows, item_map[seen])), shape=matrix.shape
    )
    now = matrix.copy()
    now.data = np.ones(len(now.data), dtype=np.int8)
    differs = np.diff((now.astype(np.int8) != before).tocsr().indptr) > 0
    is_new = np.ones(matrix.shape[0], dtype=bool)
    is_new[user_map] = False
    return np.flatnonzero(differs | is_new)


def _fold_in(rows: sp.csr_matrix, pop: np.ndarray, item_factors: np.ndarray, params) -> np.ndarray:
    """The users' factors as the factorization makes them: the normalized rows times the
    item basis (training.matrix.low_rank_factors)."""
    scaled = row_normalize(rows) @ sp.diags(
        np.maximum(pop, 1).astype(np.float32) ** -params.popularity_damping
    )
    return np.asarray(scaled @ item_factors, dtype=np.float32)


def _renumbered(model: ItemModel | None, item_map: np.ndarray, n_items: int) -> ItemModel | None:
    if model is None:
        return None
    return ItemModel(
        model.method,
        item_map[model.kept],
        model.weights,
        model.count,
        n_items,
        ease_lambda=model.ease_lambda,
        ease_dropout=model.ease_dropout,
        weighted_rows=model.weighted_rows,
    )


def _merged(
    old: Pairings,
    user_map: np.ndarray,
    item_map: np.ndarray,
    n_users: int,
    changed: np.ndarray,
    fresh: Pairings,
) -> Pairings:
    """Every user's candidates: the changed users' from ``fresh`` (rows in ``changed`` order),
    the others' from ``old`` renumbered."""
    lengths = np.zeros(n_users, dtype=np.int64)
    lengths[user_map] = np.diff(old.indptr)
    lengths[changed] = np.diff(fresh.indptr)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    # Where each old row goes, entry by entry; changed users' old rows are dropped.
    source_user = np.full(n_users, -1, dtype=np.int64)
    source_user[user_map] = np.arange(len(user_map))
    keep_old = np.ones(n_users, dtype=bool)
    keep_old[changed] = False
    kept_new_rows = np.flatnonzero(keep_old & (source_user >= 0))
    old_rows = source_user[kept_new_rows]

    def gather(rows_from: np.ndarray, indptr_from: np.ndarray) -> np.ndarray:
        counts = indptr_from[rows_from + 1] - indptr_from[rows_from]
        starts = np.repeat(indptr_from[rows_from] - np.cumsum(counts) + counts, counts)
        return starts + np.arange(counts.sum())

    old_entries = gather(old_rows, np.asarray(old.indptr))
    new_positions_old = gather(kept_new_rows, indptr)
    new_positions_fresh = gather(changed, indptr)
    total = int(indptr[-1])

    def column(name: str, dtype, remap=None) -> np.ndarray | None:
        old_values = getattr(old, name)
        fresh_values = getattr(fresh, name)
        if old_values is None or fresh_values is None:
            return None
        out = np.zeros(total, dtype=dtype)
        values = np.asarray(old_values)[old_entries]
        out[new_positions_old] = remap[values] if remap is not None else values
        out[new_positions_fresh] = np.asarray(fresh_values)
        return out

    return Pairings(
        indptr.astype(np.int64),
        column("items", np.int32, item_map),
        column("support", np.float32),
        column("neighbours", np.uint16),
        item_score=column("item_score", np.float32),
    )


def _catalog(base: Bundle):
    import pandas as pd

    return pd.read_parquet(base.catalog_path) if base.catalog_path else None
