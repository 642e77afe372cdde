"""The item model of the last refresh, kept for the next incremental one (``ENCORE_HOME/state/
item_model``): its playlists, its weights (EASE's dense B or item-KNN's sparse S) and the model
version it belongs to."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from training.items import ItemModel

logger = logging.getLogger("encore.refresh")

ITEM_MODEL_DIR = "item_model"


def save_item_model(state_dir: Path, model: ItemModel | None, version: str) -> None:
    """Keep ``model`` (of model ``version``) for the next incremental refresh."""
    target = state_dir / ITEM_MODEL_DIR
    staging = state_dir / f".{ITEM_MODEL_DIR}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    meta = {"version": version, "method": None}
    if model is not None:
        meta.update(
            method=model.method,
            count=model.count,
            n_items=model.n_items,
            ease_lambda=model.ease_lambda,
            ease_dropout=model.ease_dropout,
            weighted_rows=model.weighted_rows,
        )
        np.save(staging / "kept.npy", model.kept)
        if isinstance(model.weights, torch.Tensor):
            np.save(staging / "weights.npy", model.weights.numpy())
        else:
            sp.save_npz(staging / "weights.npz", model.weights.tocsr())
    (staging / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def load_item_model(state_dir: Path, version: str) -> tuple[bool, ItemModel | None]:
    """(found, model): the item model kept for model ``version``; found is False when there
    is none for that version (or it cannot be read)."""
    directory = state_dir / ITEM_MODEL_DIR
    try:
        meta = json.loads((directory / "meta.json").read_text())
        if meta["version"] != version:
            return False, None
        if meta["method"] is None:
            return True, None
        kept = np.load(directory / "kept.npy")
        if meta["method"] == "ease":
            weights = torch.from_numpy(np.load(directory / "weights.npy"))
        else:
            weights = sp.load_npz(directory / "weights.npz").tocsr()
        model = ItemModel(
            meta["method"],
            kept,
            weights,
            meta["count"],
            meta["n_items"],
            ease_lambda=meta["ease_lambda"],
            ease_dropout=meta.get("ease_dropout", 0.0),  # kept before EDLAE: plain EASE
            # Kept before rows were weighted: its model's ranker learnt on 0/1 rows.
            weighted_rows=meta.get("weighted_rows", False),
        )
        return True, model
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("no usable item model under %s (%s): full refresh", directory, exc)
        return False, None
