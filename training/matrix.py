"""The user x playlist matrix, its id maps, and its low-rank factors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch


@dataclass(frozen=True)
class IdMap:
    """Sorted unique ids; an id's code is its position."""

    ids: np.ndarray  # int64, sorted

    def __len__(self) -> int:
        return len(self.ids)

    def codes(self, ids: np.ndarray) -> np.ndarray:
        """Codes of ``ids``; -1 where an id is unknown."""
        ids = np.asarray(ids, dtype=np.int64)
        position = np.searchsorted(self.ids, ids)
        position = np.minimum(position, max(len(self.ids) - 1, 0))
        known = len(self.ids) > 0
        found = known & (self.ids[position] == ids) if known else np.zeros(len(ids), bool)
        return np.where(found, position, -1)


def encode(ids: np.ndarray) -> tuple[IdMap, np.ndarray]:
    unique, codes = np.unique(ids, return_inverse=True)
    return IdMap(unique.astype(np.int64)), codes.astype(np.int64)


def interaction_matrix(
    user_codes: np.ndarray, item_codes: np.ndarray, weights: np.ndarray, shape: tuple[int, int]
) -> sp.csr_matrix:
    """log1p-weighted CSR matrix; repeated (user, item) rows add their weights first."""
    summed = sp.csr_matrix(
        (np.asarray(weights, dtype=np.float64), (user_codes, item_codes)), shape=shape
    )
    summed.sum_duplicates()
    summed.data = np.log1p(summed.data)
    return summed.astype(np.float32)


def row_normalize(matrix: sp.csr_matrix) -> sp.csr_matrix:
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    norms[norms == 0] = 1.0
    return (sp.diags((1.0 / norms).astype(np.float32)) @ matrix).tocsr()


def popularity(matrix: sp.csr_matrix) -> np.ndarray:
    """Number of users holding each item."""
    return np.diff(matrix.tocsc().indptr).astype(np.int64)


def activity(matrix: sp.csr_matrix) -> np.ndarray:
    """Number of items each user holds."""
    return np.diff(matrix.indptr).astype(np.int64)


def low_rank_factors(
    matrix: sp.csr_matrix,
    *,
    dim: int = 128,
    popularity_damping: float = 0.3,
    seed: int = 0,
    iterations: int = 6,
) -> tuple[np.ndarray, np.ndarray]:
    """User and item factors from a randomized SVD of the normalized matrix.

    Rows are L2-normalized and columns divided by popularity**damping, which keeps the
    most popular items from taking over every factor. Returns ``(U * S, V)`` so that
    ``user @ item`` approximates the normalized matrix.
    """
    normalized = row_normalize(matrix)
    pop = np.maximum(popularity(matrix), 1).astype(np.float32)
    normalized = (normalized @ sp.diags(pop**-popularity_damping)).tocoo()
    rank = max(1, min(dim, min(matrix.shape) - 1))
    tensor = torch.sparse_coo_tensor(
        np.vstack([normalized.row, normalized.col]).astype(np.int64),
        normalized.data.astype(np.float32),
        size=normalized.shape,
    ).coalesce()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        u, s, v = torch.svd_lowrank(tensor, q=rank, niter=iterations)
    finally:
        torch.random.set_rng_state(generator_state)
    users = np.zeros((matrix.shape[0], dim), dtype=np.float32)
    items = np.zeros((matrix.shape[1], dim), dtype=np.float32)
    users[:, :rank] = (u * s).numpy()
    items[:, :rank] = v.numpy()
    return users, items
