"""User pairing: K nearest neighbours by cosine, and the candidates they support.

Neighbours come from blocked sparse products (exact) or, for large data, from a faiss
inverted-file index over the users' low-rank factors (approximate). A candidate's support is
the sum of the similarities of the neighbours holding it. The result is columnar (CSR arrays),
never one Python object per pair.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from training.matrix import popularity, row_normalize

logger = logging.getLogger("encore.pairing")

Progress = Callable[[int, int], None]
# Above this many multiply-adds (sum of squared item popularities) the exact product is
# slower than building an approximate index.
EXACT_WORK_LIMIT = 4e9
BLOCK_CELLS = 1 << 25  # dense cells per block: 128 MiB of float32
PAIRING_FILES = ("indptr", "items", "support", "neighbours")


@dataclass(frozen=True)
class Pairings:
    """Candidates per user code in CSR form, ordered by support (highest first)."""

    indptr: np.ndarray  # int64, n_users + 1
    items: np.ndarray  # int32 item codes
    support: np.ndarray  # float32 sum of neighbour similarities (0 for popularity fill)
    neighbours: np.ndarray  # uint16 neighbours holding the item

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name in PAIRING_FILES:
            np.save(directory / f"{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, directory: Path, *, mmap: bool = True) -> Pairings:
        mode = "r" if mmap else None
        return cls(*(np.load(directory / f"{name}.npy", mmap_mode=mode) for name in PAIRING_FILES))


@dataclass(frozen=True)
class PairingParams:
    neighbours: int = 50
    candidates: int = 75
    method: str = "auto"  # auto | exact | ann

    def resolve(self, matrix: sp.csr_matrix) -> str:
        if self.method != "auto":
            return self.method
        work = float((popularity(matrix).astype(np.float64) ** 2).sum())
        return "exact" if work <= EXACT_WORK_LIMIT else "ann"


def pair_users(
    matrix: sp.csr_matrix,
    params: PairingParams = PairingParams(),
    *,
    user_factors: np.ndarray | None = None,
    progress: Progress | None = None,
) -> Pairings:
    """Neighbours and candidates for every row of the (log-weighted) interaction matrix."""
    method = params.resolve(matrix)
    logger.debug("pairing %d users with the %s method", matrix.shape[0], method)
    if method == "exact":
        nbr_idx, nbr_sim = exact_neighbours(matrix, params.neighbours, progress=progress)
    elif method == "ann":
        if user_factors is None:
            raise ValueError("the ann pairing method needs user_factors")
        nbr_idx, nbr_sim = ann_neighbours(user_factors, params.neighbours)
    else:
        raise ValueError(f"unknown pairing method {params.method!r}; use auto, exact or ann")
    return candidates_from_neighbours(matrix, nbr_idx, nbr_sim, params.candidates)


def exact_neighbours(
    matrix: sp.csr_matrix, k: int, *, progress: Progress | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours per user (-1 / 0 pad); blocked sparse products."""
    n_users = matrix.shape[0]
    normalized = row_normalize(matrix)
    transposed = normalized.T.tocsr()
    k_eff = min(k, max(n_users - 1, 0))
    idx = np.full((n_users, k), -1, dtype=np.int64)
    sim = np.zeros((n_users, k), dtype=np.float32)
    block = max(1, BLOCK_CELLS // max(n_users, 1))
    for start in range(0, n_users, block):
        stop = min(n_users, start + block)
        scores = torch.from_numpy((normalized[start:stop] @ transposed).toarray())
        scores[torch.arange(stop - start), torch.arange(start, stop)] = -1.0  # not yourself
        if k_eff:
            values, columns = torch.topk(scores, k_eff, dim=1)
            idx[start:stop, :k_eff] = columns.numpy()
            sim[start:stop, :k_eff] = values.numpy()
        if progress:
            progress(stop, n_users)
    keep = sim > 0
    return np.where(keep, idx, -1), np.where(keep, sim, 0.0).astype(np.float32)


def ann_neighbours(user_factors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k neighbours by cosine over low-rank factors, with a faiss IVF index."""
    import faiss

    vectors = np.ascontiguousarray(user_factors, dtype=np.float32).copy()
    faiss.normalize_L2(vectors)
    n, dim = vectors.shape
    lists = max(1, int(4 * math.sqrt(n)))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(n, size=min(n, 64 * lists), replace=False)
    index.train(vectors[np.sort(sample)])
    index.add(vectors)
    index.nprobe = min(lists, 16)
    sims, idx = index.search(vectors, k + 1)
    self_hit = idx == np.arange(n)[:, None]
    # Drop the user itself (or the last neighbour when faiss did not return it).
    drop = np.where(self_hit.any(axis=1), self_hit.argmax(axis=1), k)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(n), drop] = False
    idx = idx[keep].reshape(n, k)
    sims = sims[keep].reshape(n, k)
    valid = (idx >= 0) & (sims > 0)
    return np.where(valid, idx, -1), np.where(valid, sims, 0.0).astype(np.float32)


def candidates_from_neighbours(
    matrix: sp.csr_matrix,
    nbr_idx: np.ndarray,
    nbr_sim: np.ndarray,
    cap: int,
    *,
    block_users: int = 8192,
) -> Pairings:
    """Rank each user's unseen neighbour playlists by support; pad with popular ones.

    A user whose neighbours hold nothing new gets no candidates at all (a cold user, served
    the run's popularity fallback). Others are padded with the most popular playlists they
    have not seen, up to ``cap``, so the ranker always has a full slate to order.
    """
    n_users = matrix.shape[0]
    binary = matrix.copy()
    binary.data = np.ones_like(binary.data)
    pop = popularity(matrix)
    head = np.argsort(-pop, kind="stable")
    valid = nbr_idx >= 0
    lengths = np.zeros(n_users, dtype=np.int64)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for start in range(0, n_users, block_users):
        stop = min(n_users, start + block_users)
        ok = valid[start:stop]
        rows = np.repeat(np.arange(stop - start), ok.sum(axis=1))
        cols = nbr_idx[start:stop][ok]
        sims = nbr_sim[start:stop][ok]
        weights = sp.csr_matrix((sims, (rows, cols)), shape=(stop - start, n_users))
        ones = sp.csr_matrix((np.ones_like(sims), (rows, cols)), shape=weights.shape)
        seen = binary[start:stop]
        support = _drop_seen((weights @ binary).tocsr(), seen)
        counts = _drop_seen((ones @ binary).tocsr(), seen)
        if not np.array_equal(support.indices, counts.indices):  # pragma: no cover
            raise AssertionError("support and neighbour counts lost alignment")
        # Ties in support go to the more popular playlist, deterministically.
        tie_break = pop[support.indices] / (2.0 * max(pop.max(), 1)) * 1e-4
        row, pos = _top_per_row(support.indptr, support.data + tie_break, cap)
        items = support.indices[pos].astype(np.int32)
        sup = support.data[pos].astype(np.float32)
        cnt = counts.data[pos].astype(np.uint16)
        row, items, sup, cnt = _pad_with_popular(row, items, sup, cnt, seen, head, cap)
        lengths[start:stop] = np.bincount(row, minlength=stop - start)
        parts.append((items, sup, cnt))
    indptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    if parts:
        items, sup, cnt = (np.concatenate(p) for p in zip(*parts, strict=True))
    else:
        items, sup, cnt = np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.uint16)
    return Pairings(indptr, items, sup, cnt)


def _drop_seen(scores: sp.csr_matrix, seen: sp.csr_matrix) -> sp.csr_matrix:
    scores = scores - scores.multiply(seen)
    scores.eliminate_zeros()
    scores.sort_indices()
    return scores


def _top_per_row(
    indptr: np.ndarray, data: np.ndarray, k: int, *, cells: int = 1 << 23
) -> tuple[np.ndarray, np.ndarray]:
    """Per CSR row, positions of its k largest values; returns (row, position) sorted by row.

    Rows are bucketed by length (powers of two) and padded per bucket, so memory stays
    bounded and padding never more than doubles the work.
    """
    lengths = np.diff(indptr)
    rows_out, pos_out = [], []
    bucket = np.ceil(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    for b in np.unique(bucket[lengths > 0]):
        members = np.flatnonzero((bucket == b) & (lengths > 0))
        width = int(lengths[members].max())
        chunk = max(1, cells // width)
        for i in range(0, len(members), chunk):
            rows = members[i : i + chunk]
            offsets = np.arange(width)
            inside = offsets[None, :] < lengths[rows][:, None]
            pos = np.minimum(indptr[rows][:, None] + offsets[None, :], len(data) - 1)
            values = torch.from_numpy(np.where(inside, data[pos], -np.inf).astype(np.float64))
            top_values, top_cols = torch.topk(values, min(k, width), dim=1)
            keep = torch.isfinite(top_values).numpy()
            chosen = np.take_along_axis(pos, top_cols.numpy(), axis=1)
            rows_out.append(np.broadcast_to(rows[:, None], keep.shape)[keep])
            pos_out.append(chosen[keep])
    if not rows_out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows_all, pos_all = np.concatenate(rows_out), np.concatenate(pos_out)
    order = np.argsort(rows_all, kind="stable")
    return rows_all[order], pos_all[order]


def _pad_with_popular(
    row: np.ndarray,
    items: np.ndarray,
    sup: np.ndarray,
    cnt: np.ndarray,
    seen: sp.csr_matrix,
    head: np.ndarray,
    cap: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Append popular unseen playlists to rows holding between 1 and cap - 1 candidates."""
    n_rows = seen.shape[0]
    have = np.bincount(row, minlength=n_rows)
    short = np.flatnonzero((have > 0) & (have < cap))
    if len(short) == 0:
        return row, items, sup, cnt
    width = min(len(head), cap + int(np.diff(seen.indptr)[short].max(initial=0)))
    fill_items = head[:width]
    taken = seen[short].tocsr()
    taken = taken + sp.csr_matrix(
        (np.ones(len(row)), (row, items)), shape=(n_rows, seen.shape[1])
    ).tocsr()[short]
    blocked = taken[:, fill_items].toarray() > 0
    need = (cap - have[short])[:, None]
    wanted = ~blocked & (np.cumsum(~blocked, axis=1) <= need)
    fill_row = np.broadcast_to(short[:, None], wanted.shape)[wanted]
    fill_item = np.broadcast_to(fill_items[None, :], wanted.shape)[wanted].astype(np.int32)
    all_rows = np.concatenate([row, fill_row])
    order = np.argsort(all_rows, kind="stable")  # supported candidates stay ahead of the fill
    return (
        all_rows[order],
        np.concatenate([items, fill_item])[order],
        np.concatenate([sup, np.zeros(len(fill_row), np.float32)])[order],
        np.concatenate([cnt, np.zeros(len(fill_row), np.uint16)])[order],
    )
