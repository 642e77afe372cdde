"""User pairing: K nearest neighbours by cosine, and the candidates they support.

Neighbours come from blocked sparse products (exact) or, for large data, from a faiss
inverted-file index over the users' low-rank factors (approximate). A candidate's support is
the sum of the similarities of the neighbours holding it. The result is columnar (CSR arrays),
never one Python object per pair.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
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
# Approximate search (see ann_neighbours): lists per sqrt(users), lists probed per user,
# k-means iterations, users per search batch, score cells per product (~1 MiB, in L2).
ANN_LISTS_PER_ROOT = 2.0
ANN_PROBES = 12
ANN_KMEANS_ITERATIONS = 10
ANN_SEED = 1234
ANN_QUERY_BATCH = 32768
ANN_CELLS = 1 << 18
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
    """Top-k neighbours by cosine over low-rank factors: an inverted file searched by GEMM.

    faiss's spherical k-means splits users into lists and finds each user's ``ANN_PROBES``
    nearest lists, as its IVF index would; but instead of scanning lists query by query
    (~80 ns per user pair on a 2-core machine), the users probing a list are scored against it
    in one matrix product and only scores that can still make a top-k are kept (~10 ns).
    """
    import faiss

    factors = np.ascontiguousarray(user_factors, dtype=np.float32)
    n, dim = factors.shape
    idx = np.full((n, k), -1, dtype=np.int64)
    sim = np.zeros((n, k), dtype=np.float32)
    if n < 2 or k == 0:
        return idx, sim
    # ~2 sqrt(n) lists balance k-means and probing against the list scans; faiss wants ~39
    # training points per list, and 64 are plenty.
    lists = max(1, min(int(ANN_LISTS_PER_ROOT * math.sqrt(n)), n // 39))
    clock = time.perf_counter()
    if lists > 1:
        rng = np.random.default_rng(ANN_SEED)
        sample = factors[np.sort(rng.choice(n, size=min(n, 64 * lists), replace=False))]
        faiss.normalize_L2(sample)
        kmeans = faiss.Kmeans(
            dim, lists, niter=ANN_KMEANS_ITERATIONS, seed=ANN_SEED, spherical=True, verbose=False
        )
        kmeans.train(sample)
        # A user's norm does not change which centroids are nearest: no normalized copy yet.
        _, probes = kmeans.index.search(factors, min(lists, ANN_PROBES))
    else:
        probes = np.zeros((n, 1), dtype=np.int64)
    logger.debug("ann: %d lists and probes in %.1fs", lists, time.perf_counter() - clock)
    # Users sorted by their own (nearest) list: each list is a contiguous slice, and a batch
    # of consecutive users shares most of its probes.
    order = np.argsort(probes[:, 0], kind="stable")
    starts = np.r_[0, np.cumsum(np.bincount(probes[:, 0], minlength=lists))]
    ordered = factors[order]
    faiss.normalize_L2(ordered)
    search = _ProbeSearch(torch.from_numpy(ordered), probes[order], starts, k)
    del probes
    clock = time.perf_counter()
    workers = _threads()
    with _torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
        for first, (found, scores) in zip(
            range(0, n, ANN_QUERY_BATCH),
            pool.map(search, range(0, n, ANN_QUERY_BATCH)),
            strict=True,
        ):
            users = order[first : first + len(found)]
            valid = (found >= 0) & (scores > 0)
            idx[users] = np.where(valid, order[np.maximum(found, 0)], -1)
            sim[users] = np.where(valid, scores, 0.0)
    logger.debug("ann: search in %.1fs", time.perf_counter() - clock)
    return idx, sim


@dataclass(frozen=True)
class _ProbeSearch:
    """Top-``width`` of one batch of (list-ordered) users over the lists they probe.

    Selecting from every score costs more than computing it (``torch.topk`` ~8-25 ns per
    element against ~3 for the product), so selection is deferred: a lower bound on each
    user's ``width``-th best score comes from its own list (the ``width``-th largest of
    chunk maxima: each maximum is a distinct score), only scores above it survive a compare,
    and the survivors are ranked by one sort of packed int64 keys.
    """

    ordered: torch.Tensor  # normalized vectors, grouped by list
    probes: np.ndarray  # lists probed per row of ``ordered``, its own list first
    starts: np.ndarray  # first row of each list
    width: int

    def __call__(self, first: int) -> tuple[np.ndarray, np.ndarray]:
        last = min(len(self.ordered), first + ANN_QUERY_BATCH)
        n_rows = last - first
        queries = self.ordered[first:last]
        pack = _ScoreKeys.plan(len(self.ordered))
        floor = np.full(n_rows, -np.inf, dtype=np.float32)
        best = np.zeros(0, dtype=np.int64)
        # The own list, the second nearest, then the rest at once: floors rise early (the
        # second list still holds many better scores) without splitting the rest into many
        # small products.
        n_probes = self.probes.shape[1]
        for lo_p, hi_p in ((0, 1), (1, 2), (2, n_probes)):
            lists = self.probes[first:last, lo_p:hi_p].ravel()
            if len(lists) == 0:
                break
            by_list = np.argsort(lists, kind="stable")
            keys = [best]
            for group in np.split(by_list, np.flatnonzero(np.diff(lists[by_list])) + 1):
                lo, hi = int(self.starts[lists[group[0]]]), int(self.starts[lists[group[0]] + 1])
                for a, b in _chunks(0, len(group), hi - lo):
                    rows = group[a:b] // (hi_p - lo_p)
                    scores = queries[torch.from_numpy(rows)] @ self.ordered[lo:hi].T
                    if lo_p == 0:  # one more: the user itself is among these scores
                        floor[rows] = _score_floor(scores, self.width + 1)
                    keys.append(pack.survivors(rows, first, lo, scores.numpy(), floor[rows]))
            best = pack.first(np.sort(np.concatenate(keys)), n_rows, self.width)
            floor = pack.floor(best, n_rows, self.width)
        return pack.top(best, n_rows, self.width)


@dataclass(frozen=True)
class _ScoreKeys:
    """(batch row, score, position) packed in an int64 that sorts rows, then best first."""

    position_bits: int
    score_bits: int

    @classmethod
    def plan(cls, n: int) -> _ScoreKeys:
        position_bits = max(1, (n - 1).bit_length())
        return cls(position_bits, 63 - position_bits - (ANN_QUERY_BATCH - 1).bit_length())

    @property
    def scale(self) -> float:
        # Scores in [-1, 1] to levels 0..2 scale; an integer scale decodes 0 and 1 exactly.
        return float((1 << (self.score_bits - 1)) - 1)

    @property
    def row_shift(self) -> int:
        return self.position_bits + self.score_bits

    def survivors(
        self, rows: np.ndarray, first: int, lo: int, scores: np.ndarray, floor: np.ndarray
    ) -> np.ndarray:
        """Keys of the ``scores`` at or above their row's ``floor``, but each user's own.

        Row ``i`` scores batch row ``rows[i]`` (user ``first + rows[i]``); column ``j`` is
        user ``lo + j``.
        """
        # numpy's compare and flatnonzero are ~4x cheaper here than torch's nonzero.
        hits = np.flatnonzero(scores >= floor[:, None])
        row, col = np.divmod(hits, scores.shape[1])
        other = rows[row] + first != col + lo
        hits, row, col = hits[other], row[other], col[other]
        level = np.rint(np.clip(1.0 - scores.ravel()[hits].astype(np.float64), 0, 2) * self.scale)
        return (
            (rows[row].astype(np.int64) << self.row_shift)
            | (level.astype(np.int64) << self.position_bits)
            | (col + lo)
        )

    def first(self, keys: np.ndarray, n_rows: int, width: int) -> np.ndarray:
        """The first ``width`` of every row's sorted keys."""
        row = keys >> self.row_shift
        return keys[np.arange(len(keys)) - np.searchsorted(row, np.arange(n_rows))[row] < width]

    def floor(self, keys: np.ndarray, n_rows: int, width: int) -> np.ndarray:
        """Per row of ``first``'s output, at most its ``width``-th best score (-inf with fewer)."""
        counts = np.bincount(keys >> self.row_shift, minlength=n_rows)
        floor = np.full(n_rows, -np.inf, dtype=np.float32)
        full = counts == width
        last = keys[(np.cumsum(counts) - 1)[full]]
        level = (last >> self.position_bits) & ((1 << self.score_bits) - 1)
        floor[full] = 1.0 - (level + 1) / self.scale  # levels are rounded to the nearest
        return floor

    def top(self, keys: np.ndarray, n_rows: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted keys, at most ``width`` per row, as (positions, scores) padded to width."""
        row = keys >> self.row_shift
        rank = np.arange(len(keys)) - np.searchsorted(row, np.arange(n_rows))[row]
        positions = np.full((n_rows, width), -1, dtype=np.int64)
        scores = np.zeros((n_rows, width), dtype=np.float32)
        positions[row, rank] = keys & ((1 << self.position_bits) - 1)
        level = (keys >> self.position_bits) & ((1 << self.score_bits) - 1)
        scores[row, rank] = 1.0 - level / self.scale
        return positions, scores


def _chunks(lo: int, hi: int, columns: int) -> list[tuple[int, int]]:
    step = max(1, ANN_CELLS // max(columns, 1))  # keeps each score block in cache
    return [(a, min(hi, a + step)) for a in range(lo, hi, step)]


def _score_floor(scores: torch.Tensor, width: int) -> np.ndarray:
    """Per row, a value at most its ``width``-th largest score (-inf with fewer scores)."""
    n_rows, n_cols = scores.shape
    if n_cols < width:
        return np.full(n_rows, -np.inf, dtype=np.float32)
    chunk = max(1, n_cols // (4 * width))
    maxima = scores[:, : (n_cols // chunk) * chunk].reshape(n_rows, -1, chunk).amax(dim=2)
    return torch.topk(maxima, width, dim=1, sorted=False).values.amin(dim=1).numpy()


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    # Many small products run side by side on a thread pool; torch's own intra-op threads
    # would only fight them (and make the results depend on the core count).
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    have not seen, up to ``cap``, so the ranker always has a full slate to order. Ties in
    support go to the more popular playlist.
    """
    n_users, n_items = matrix.shape
    k = nbr_idx.shape[1] if nbr_idx.ndim == 2 else 0
    head = np.argsort(-popularity(matrix), kind="stable")
    rank_of = np.empty(n_items, dtype=np.int64)
    rank_of[head] = np.arange(n_items)
    # Columns renumbered by popularity rank: a product's column is then its tie-break key.
    held = sp.csr_matrix(
        (np.ones(matrix.nnz, np.int64), rank_of[matrix.indices], matrix.indptr),
        shape=matrix.shape,
    )
    code = _KeyCode.plan(n_items, k, block_users, _max_support(nbr_idx, nbr_sim))

    def block(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        stop = min(n_users, start + code.block)
        keys = _block_keys(held, nbr_idx[start:stop], nbr_sim[start:stop], start, code)
        keys = _top_keys(keys, stop - start, cap, code)
        keys = _pad_with_popular(keys, held[start:stop], cap, code)
        ranks, support, count = code.decode(keys)
        lengths = np.bincount(keys >> code.row_shift, minlength=stop - start)
        return lengths, head[ranks].astype(np.int32), support, count.astype(np.uint16)

    # scipy's sparse product and numpy's sort release the GIL, so blocks run side by side.
    with ThreadPoolExecutor(max_workers=_threads()) as pool:
        parts = list(pool.map(block, range(0, n_users, code.block)))
    if not parts:
        empty = np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.uint16)
        return Pairings(np.zeros(n_users + 1, np.int64), *empty)
    fields = []
    for field in range(4):  # one field at a time: the copy never doubles the whole output
        fields.append(np.concatenate([part[field] for part in parts]))
        parts = [(*part[:field], None, *part[field + 1 :]) for part in parts]
    indptr = np.r_[0, np.cumsum(fields[0])].astype(np.int64)
    return Pairings(indptr, *fields[1:])


def _threads() -> int:
    """Worker threads for the pairing: the torch setting, which the caller may have lowered."""
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


@dataclass(frozen=True)
class _KeyCode:
    """Packing of (row, support, popularity rank, count) into one sortable int64.

    Sorting the keys orders rows, then support (highest first), then popularity: a plain
    ``np.sort`` of int64 is an order of magnitude faster than any argsort.
    """

    block: int
    count_bits: int
    rank_bits: int
    support_bits: int
    unit: float  # support quantum per 1.0 of similarity

    @classmethod
    def plan(cls, n_items: int, k: int, block: int, max_support: float) -> _KeyCode:
        count_bits = max(1, (k + 1).bit_length())
        rank_bits = max(1, (n_items - 1).bit_length())
        block = max(1, block)
        while True:
            row_bits = max(1, (block - 1).bit_length())
            support_bits = 62 - row_bits - rank_bits - count_bits
            if support_bits >= 24 or block == 1:
                break
            block //= 2
        if support_bits < 8:
            raise ValueError(f"{n_items} items and {k} neighbours do not fit a 64-bit key")
        # Headroom for rounding each neighbour's share up, and for the padding code.
        room = (1 << support_bits) - 2 - k
        return cls(block, count_bits, rank_bits, support_bits, room / max(max_support, 1e-12))

    @property
    def count_unit(self) -> int:
        return 1 << self.support_bits

    @property
    def padding(self) -> int:
        return (1 << self.support_bits) - 1  # sorts after every supported candidate

    @property
    def row_shift(self) -> int:
        return self.support_bits + self.rank_bits + self.count_bits

    def encode(self, row: np.ndarray, support: np.ndarray, rank: np.ndarray, count: np.ndarray):
        return (
            (row << self.row_shift)
            | ((self.padding - 1 - support) << (self.rank_bits + self.count_bits))
            | (rank << self.count_bits)
            | count
        )

    def decode(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Popularity ranks, support (float32, 0 for padding) and counts of ``keys``."""
        count = keys & ((1 << self.count_bits) - 1)
        rank = (keys >> self.count_bits) & ((1 << self.rank_bits) - 1)
        inverted = (keys >> (self.rank_bits + self.count_bits)) & self.padding
        support = np.where(inverted == self.padding, 0, self.padding - 1 - inverted)
        return rank, (support / self.unit).astype(np.float32), count


def _max_support(nbr_idx: np.ndarray, nbr_sim: np.ndarray, rows: int = 1 << 16) -> float:
    best = 0.0
    for start in range(0, len(nbr_idx), rows):
        ok = nbr_idx[start : start + rows] >= 0
        sims = np.where(ok, np.maximum(nbr_sim[start : start + rows], 0), 0)
        best = max(best, float(sims.sum(axis=1, dtype=np.float64).max(initial=0.0)))
    return best


def _block_keys(
    held: sp.csr_matrix, idx: np.ndarray, sim: np.ndarray, start: int, code: _KeyCode
) -> np.ndarray:
    """Unsorted keys of every unseen playlist held by a neighbour, for one block of users.

    One integer product gives support and neighbour count together (count in the high bits,
    quantized support in the low ones), and a large negative weight on the user's own row
    marks every playlist it has already seen.
    """
    n = len(idx)
    ok = idx >= 0
    quantized = np.rint(np.maximum(sim, 0).astype(np.float64) * code.unit).astype(np.int64)
    # Each row: its neighbours, then the user itself; built as CSR directly (no COO sort).
    cols = np.concatenate([idx, np.arange(start, start + n)[:, None]], axis=1)
    data = np.concatenate(
        [quantized + code.count_unit, np.full((n, 1), -(1 << 61), np.int64)], axis=1
    )
    mask = np.concatenate([ok, np.ones((n, 1), bool)], axis=1)
    indptr = np.r_[0, np.cumsum(mask.sum(axis=1))]
    mix = sp.csr_matrix((data[mask], cols[mask], indptr), shape=(n, held.shape[0]))
    totals = mix @ held
    data = totals.data
    keep = data > 0
    row = np.repeat(np.arange(n, dtype=np.int64), np.diff(totals.indptr))[keep]
    data = data[keep]
    return code.encode(
        row,
        data & (code.count_unit - 1),
        totals.indices[keep].astype(np.int64),
        data >> code.support_bits,
    )


def _top_keys(keys: np.ndarray, n_rows: int, cap: int, code: _KeyCode) -> np.ndarray:
    """The ``cap`` best keys of every row, in order."""
    keys.sort()
    row = keys >> code.row_shift
    first = np.searchsorted(row, np.arange(n_rows))
    return keys[np.arange(len(keys)) - first[row] < cap]


def _pad_with_popular(
    keys: np.ndarray, held: sp.csr_matrix, cap: int, code: _KeyCode
) -> np.ndarray:
    """Add popular unseen playlists to rows holding between 1 and cap - 1 candidates."""
    n_rows, n_items = held.shape
    row = keys >> code.row_shift
    have = np.bincount(row, minlength=n_rows)
    short = np.flatnonzero((have > 0) & (have < cap))
    if len(short) == 0:
        return keys
    # Popularity ranks are the columns of ``held``, so the fill is the first free ranks.
    seen = np.diff(held.indptr)
    width = min(n_items, cap + int(seen[short].max(initial=0)))
    slot = np.full(n_rows, -1, dtype=np.int64)
    slot[short] = np.arange(len(short))
    blocked = np.zeros((len(short), width), dtype=bool)
    rank_mask = (1 << code.rank_bits) - 1
    taken = (
        (np.repeat(np.arange(n_rows), seen), held.indices.astype(np.int64)),
        (row, (keys >> code.count_bits) & rank_mask),
    )
    for owner, rank in taken:
        hit = (slot[owner] >= 0) & (rank < width)
        blocked[slot[owner[hit]], rank[hit]] = True
    free = ~blocked
    wanted = free & (np.cumsum(free, axis=1) <= (cap - have[short])[:, None])
    fill_slot, fill_rank = np.nonzero(wanted)
    fill = code.encode(short[fill_slot], np.int64(-1), fill_rank.astype(np.int64), np.int64(0))
    merged = np.concatenate([keys, fill])
    merged.sort()
    return merged
