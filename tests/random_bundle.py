"""A bundle of the real ranking model's architecture with random weights, and pairings made
directly (no training). For benchmarks and tests of the nightly run and the serving path,
where the time or the plumbing matters and the quality does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from encore.bundle import Bundle, promote, write_bundle
from inference.ranker import Ranker
from training.pairing import Pairings


def build_random_bundle(
    bundles_dir: Path,
    *,
    users: int,
    playlists: int,
    candidates: int = 75,
    dim: int = 128,
    cold_every: int = 0,
    version: str = "random",
    seed: int = 0,
    names: bool | Mapping[int, str] = False,
    promote_it: bool = True,
) -> Bundle:
    """Users get ids ``7 * (code + 1)``, playlists ``code + 1``.

    ``cold_every = k`` leaves every k-th user without candidates (a cold user).
    ``names=True`` writes a catalog naming every playlist ``Playlist <id>``; a mapping
    ``{playlist_id: name}`` writes exactly those names (other playlists have none).
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    ranker = Ranker(users, playlists, dim=dim, candidates=candidates)
    with torch.no_grad():
        ranker.user_embedding.weight.normal_(0, 0.1)
        ranker.item_embedding.weight.normal_(0, 0.1)
    popularity = np.floor(1e5 / np.arange(1, playlists + 1) ** 0.9).astype(np.int64)
    ranker.set_tables(
        ranker.user_embedding.weight.detach(),
        ranker.item_embedding.weight.detach(),
        rng.integers(1, 200, users),
        popularity,
    )
    lengths = np.full(users, candidates, dtype=np.int64)
    if cold_every:
        lengths[::cold_every] = 0
    total = int(lengths.sum())
    support = np.sort(rng.random(total, dtype=np.float32))[::-1]
    pairings = Pairings(
        indptr=np.r_[0, np.cumsum(lengths)].astype(np.int64),
        items=_distinct_candidates(rng, lengths, playlists, candidates),
        support=np.ascontiguousarray(support),
        neighbours=rng.integers(0, 50, total, dtype=np.uint16),
        item_score=rng.random(total, dtype=np.float32),
    )
    playlist_ids = np.arange(1, playlists + 1, dtype=np.int64)

    def contents(directory: Path) -> None:
        torch.save(ranker.state_dict(), directory / "weights.pt")
        np.save(directory / "user_ids.npy", np.arange(1, users + 1, dtype=np.int64) * 7)
        np.save(directory / "playlist_ids.npy", playlist_ids)
        np.save(directory / "popularity.npy", popularity)
        pairings.save(directory / "pairings")
        if isinstance(names, Mapping):
            catalog = pd.DataFrame(
                {"playlist_id": list(names), "name": list(names.values())}
            ).astype({"playlist_id": "int64", "name": "string"})
        elif names:
            catalog = pd.DataFrame(
                {"playlist_id": playlist_ids, "name": [f"Playlist {i}" for i in playlist_ids]}
            )
        else:
            catalog = None
        if catalog is not None:
            catalog.to_parquet(directory / "catalog.parquet", index=False)

    metadata = {
        "data_fingerprint": f"sha256:random-{seed}",
        "data": {"users": users, "playlists": playlists},
        "hyperparameters": {"random_weights": True, "seed": seed},
        "metrics": {},
        "model": {
            "kind": "ranker",
            "class": "inference.ranker.Ranker",
            "n_users": users,
            "n_items": playlists,
            "dim": dim,
            "hidden": [32],
            "neighbours": 50,
            "candidates": candidates,
            "features": list(ranker.feature_names),
        },
    }
    bundle = write_bundle(bundles_dir, version=version, metadata=metadata, write_contents=contents)
    if promote_it:
        promote(bundles_dir, bundle.version)
    return bundle


def _distinct_candidates(
    rng: np.random.Generator, lengths: np.ndarray, playlists: int, candidates: int
) -> np.ndarray:
    """Each user's candidates: distinct playlists, as real pairings have them."""
    if candidates > playlists:
        raise ValueError(f"candidates ({candidates}) cannot exceed playlists ({playlists})")
    # A stride coprime with the playlist count visits `candidates` distinct residues.
    step = max(1, playlists // max(candidates, 1))
    while math.gcd(step, playlists) != 1:
        step += 1
    offsets = rng.integers(0, playlists, int((lengths > 0).sum()), dtype=np.int64)
    grid = (offsets[:, None] + np.arange(candidates, dtype=np.int64)[None, :] * step) % playlists
    return grid.astype(np.int32).ravel()
