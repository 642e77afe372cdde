"""The user x playlist matrix, its id maps, and its low-rank factors."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from encore.ids import IdMap
from inference.lists import popular_fill as _popular_fill

GRAM_ROWS = 1 << 17  # rows per float64 block of the Gram matrix: 128 MiB at rank 128
# Rows of the long side per sparse product: a (block x rank) float32 product is 512 MiB at rank
# 128, where one product over 10M users would hold 5 GB (and torch a copy of it).
LONG_BLOCK_ROWS = 1 << 20


def encode(ids: np.ndarray) -> tuple[IdMap, np.ndarray]:
    unique, codes = np.unique(ids, return_inverse=True)
    return IdMap(unique.astype(np.int64)), codes.astype(np.int64)


def merge_repeats(
    user_codes: np.ndarray, item_codes: np.ndarray, weights: np.ndarray, n_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per (user, item) pair, its weights summed, in the order of each pair's first row.

    The protocol splits rows: without this, a pair listed twice could be held out and trained
    on at once. Returns the inputs themselves when no pair repeats.
    """
    keys = np.asarray(user_codes, dtype=np.int64) * n_items + item_codes
    unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    if len(unique) == len(keys):
        return user_codes, item_codes, weights
    summed = np.bincount(inverse, weights=weights, minlength=len(unique))
    order = np.argsort(first, kind="stable")
    rows = first[order]
    return user_codes[rows], item_codes[rows], summed[order].astype(np.float32)


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


def popular_fill(
    seen: sp.csr_matrix, taken_rows: np.ndarray, taken_ranks: np.ndarray, need: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the ``need[row]`` most popular items it has neither seen nor taken.

    ``seen`` holds the rows' interactions with its columns renumbered by popularity rank (0 is
    the most popular item); ``(taken_rows, taken_ranks)`` are ranks the rows already hold.
    Returns ``(row, rank)`` pairs ordered by row, then rank. The pairing pads short candidate
    lists with it, the evaluation and the nightly run short top-n lists
    (:func:`inference.lists.popular_fill`, the same rule).
    """
    return _popular_fill(seen.indptr, seen.indices, seen.shape[1], taken_rows, taken_ranks, need)


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
    normalized = (normalized @ sp.diags(pop**-popularity_damping)).tocsr().astype(np.float32)
    rank = max(1, min(dim, min(matrix.shape) - 1))
    if normalized.nnz == 0:
        return _widen(torch.zeros(matrix.shape[0], 0), dim), _widen(
            torch.zeros(matrix.shape[1], 0), dim
        )
    generator = torch.Generator().manual_seed(seed)
    # The subspace iteration runs on the shorter side (items, with many users), so every QR
    # is on a short matrix; the long side only ever meets sparse products and one Gram matrix.
    users_long = matrix.shape[0] >= matrix.shape[1]
    long_side = _LongSide.of(normalized if users_long else normalized.T.tocsr())
    del normalized
    basis, projected, scale = _subspace(long_side, rank, iterations, generator)
    if users_long:
        return _widen(projected, dim), _widen(basis, dim)  # B W = U S, Q W = V
    inverse = torch.where(scale > 0, 1.0 / scale.clamp(min=1e-30), 0.0)
    return _widen(basis * scale, dim), _widen(projected.mul_(inverse), dim)  # Q W S, B W / S


@dataclass(frozen=True)
class _LongSide:
    """A tall sparse matrix (m x n, m >= n) in blocks of rows, each with its transpose."""

    shape: tuple[int, int]
    blocks: list[tuple[int, torch.Tensor, torch.Tensor]]  # (first row, rows, rows transposed)

    @classmethod
    def of(cls, matrix: sp.csr_matrix) -> _LongSide:
        blocks = []
        for start in range(0, matrix.shape[0], LONG_BLOCK_ROWS):
            rows = matrix[start : start + LONG_BLOCK_ROWS]
            blocks.append((start, _csr_tensor(rows), _csr_tensor(rows.T.tocsr())))
        return cls(matrix.shape, blocks)

    def times(self, dense: torch.Tensor) -> torch.Tensor:
        """``A @ dense`` (m x rank), block by block into one output."""
        out = torch.empty(self.shape[0], dense.shape[1])
        for start, block, _ in self.blocks:
            out[start : start + block.shape[0]] = block @ dense
        return out

    def normal_times(self, dense: torch.Tensor) -> torch.Tensor:
        """``A.T @ (A @ dense)`` (n x rank), summed over the blocks."""
        total = torch.zeros(self.shape[1], dense.shape[1])
        for _, block, transposed in self.blocks:
            total += transposed @ (block @ dense)
        return total


def _widen(factors: torch.Tensor, dim: int) -> np.ndarray:
    """``factors`` as float32 numpy with zero columns up to ``dim`` (no copy when full)."""
    if factors.shape[1] == dim:
        return factors.numpy()
    wide = np.zeros((factors.shape[0], dim), dtype=np.float32)
    wide[:, : factors.shape[1]] = factors.numpy()
    return wide


def _csr_tensor(matrix: sp.csr_matrix) -> torch.Tensor:
    # torch's CSR x dense product is multi-threaded and ~3x faster than scipy's or COO's.
    index = np.int32 if matrix.nnz < 2**31 and max(matrix.shape) < 2**31 else np.int64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(matrix.indptr.astype(index)),
            torch.from_numpy(matrix.indices.astype(index)),
            torch.from_numpy(matrix.data.astype(np.float32, copy=False)),
            size=matrix.shape,
            check_invariants=False,
        )


def _subspace(
    a: _LongSide, rank: int, iterations: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD of ``a`` (m x n) with the basis kept on the n side.

    Returns ``(Q W, A Q W, S)``: ``a ~= (A Q W) (Q W).T`` with ``Q W`` orthonormal, columns in
    decreasing singular value order and signs fixed, so the same seed gives the same factors.
    """
    basis = _orthonormalize(torch.randn(a.shape[1], rank, generator=generator))
    for _ in range(iterations):
        basis = _orthonormalize(a.normal_times(basis))
    projected = a.times(basis)
    # An eigendecomposition of the small Gram matrix replaces an SVD of the long m x rank
    # product.
    gram = _gram(projected)
    eigenvalues, rotation = torch.linalg.eigh(gram)
    eigenvalues, rotation = eigenvalues.flip(0), rotation.flip(1)
    basis = basis @ rotation.float()
    signs = torch.sign(basis.gather(0, basis.abs().argmax(dim=0, keepdim=True)))
    signs[signs == 0] = 1.0
    basis *= signs
    rotation = rotation.float() * signs
    for start in range(0, projected.shape[0], GRAM_ROWS):  # in place: no second m x rank copy
        projected[start : start + GRAM_ROWS] = projected[start : start + GRAM_ROWS] @ rotation
    return basis, projected, eigenvalues.clamp(min=0).sqrt().float()


def _gram(tall: torch.Tensor) -> torch.Tensor:
    """``tall.T @ tall`` accumulated in float64 by blocks, so small singular values survive."""
    gram = torch.zeros(tall.shape[1], tall.shape[1], dtype=torch.float64)
    for start in range(0, tall.shape[0], GRAM_ROWS):
        part = tall[start : start + GRAM_ROWS].double()
        gram += part.T @ part
    return gram


def _orthonormalize(tall: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of ``tall`` (n x rank, n >> rank).

    Cholesky QR, twice: two Gram products and a triangular solve cost a fraction of a
    Householder QR (4x less at 100k x 128), and the float64 Gram matrix with a second pass
    keeps the basis orthonormal to float32 precision. A rank-deficient input falls back to QR.
    """
    for _ in range(2):
        factor, info = torch.linalg.cholesky_ex(_gram(tall))
        if int(info) != 0:
            return torch.linalg.qr(tall).Q
        identity = torch.eye(tall.shape[1], dtype=torch.float64)
        inverse_t = torch.linalg.solve_triangular(factor, identity, upper=False).T
        tall = torch.cat(
            [
                (tall[start : start + GRAM_ROWS].double() @ inverse_t).float()
                for start in range(0, tall.shape[0], GRAM_ROWS)
            ]
        )
    return tall
