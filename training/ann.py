"""Approximate nearest neighbours of users: an inverted file searched by dense products.

faiss's spherical k-means splits the users' low-rank factors into lists; each user is then
compared with the users of its nearest lists by matrix products in torch, keeping the ``k``
best. Used by the pairing above the size where exact blocked products get slow.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from training.spill import release_rows

logger = logging.getLogger("encore.pairing")

# Approximate search (see ann_neighbours): lists per sqrt(users), lists probed per user,
# k-means iterations, users per search batch, score cells per product (~1 MiB, in L2).
ANN_LISTS_PER_ROOT = 2.0
ANN_PROBES = 12
ANN_KMEANS_ITERATIONS = 10
ANN_SEED = 1234
ANN_QUERY_BATCH = 32768
# Queries per batch per list at least: a batch's queries meet each list they probe in one
# product, and below a few dozen rows a product costs its call, not its arithmetic (at 10M
# users, 32768 queries over 6,324 lists gave products of ~5 rows and a search 4x slower).
ANN_QUERIES_PER_LIST = 64
ANN_CELLS = 1 << 18
ANN_COMPACT_KEYS = 1 << 23  # survivors held per search call before a cut, at least
ANN_GROUP_ROWS = 1 << 16  # rows copied at a time when grouping users by list


def ann_neighbours(
    user_factors: np.ndarray,
    k: int,
    *,
    queries: np.ndarray | None = None,
    ray: bool = False,
    ray_address: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k neighbours by cosine over low-rank factors: an inverted file searched by GEMM.

    faiss's spherical k-means splits users into lists and finds each user's ``ANN_PROBES``
    nearest lists, as its IVF index would; but instead of scanning lists query by query
    (~80 ns per user pair on a 2-core machine), the users probing a list are scored against it
    in one matrix product and only scores that can still make a top-k are kept (~10 ns).
    With ``queries`` (user codes), only those users' neighbours are searched, among all users:
    row ``i`` of the result belongs to ``queries[i]``.
    """
    import faiss

    factors = np.ascontiguousarray(user_factors, dtype=np.float32)  # a memory map stays one
    n, dim = factors.shape
    queries = np.arange(n) if queries is None else np.asarray(queries, dtype=np.int64)
    # Positions fit int32 below 2**31 users: half the memory of the largest output.
    idx = np.full((len(queries), k), -1, dtype=np.int32 if n < 2**31 else np.int64)
    sim = np.zeros((len(queries), k), dtype=np.float32)
    if n < 2 or k == 0 or len(queries) == 0:
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
        release_rows(user_factors)  # the sample touched pages all over the map
        # A user's norm does not change which centroids are nearest: no normalized copy yet.
        # Only the queries need all their probes; the others only their own list.
        probes = min(lists, ANN_PROBES)
        if len(queries) == n:
            query_probes = _nearest_lists(kmeans.index, factors, user_factors, probes)
            own = query_probes[:, 0].copy()
        else:
            own = _nearest_lists(kmeans.index, factors, user_factors, 1)[:, 0]
            query_probes = _nearest_lists(kmeans.index, factors[queries], None, probes)
    else:
        own = np.zeros(n, dtype=np.int64)
        query_probes = np.zeros((len(queries), 1), dtype=np.int32)
    logger.debug("ann: %d lists and probes in %.1fs", lists, time.perf_counter() - clock)
    # Users sorted by their own (nearest) list: each list is a contiguous slice, and a batch
    # of consecutive queries shares most of its probes.
    order = np.argsort(own, kind="stable")
    starts = np.r_[0, np.cumsum(np.bincount(own, minlength=lists))]
    del own
    query_order = np.argsort(query_probes[:, 0], kind="stable")
    query_probes = query_probes[query_order]  # before the largest copy below, not beside it
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    query_positions = position[queries[query_order]]
    ordered = _grouped(factors, user_factors, position)
    del position
    faiss.normalize_L2(ordered)
    full = len(queries) == n
    search = _ProbeSearch(
        torch.from_numpy(ordered),
        starts,
        k,
        max(ANN_QUERY_BATCH, ANN_QUERIES_PER_LIST * lists),
        queries=None if full else torch.from_numpy(ordered[query_positions]),
        probes=query_probes,
        positions=None if full else query_positions,
    )
    del query_probes, ordered
    clock = time.perf_counter()
    firsts = range(0, len(queries), search.batch)
    found_blocks = (
        _search_on_ray(search, firsts, ray_address) if ray else _search_here(search, firsts)
    )
    for first, (found, scores) in zip(firsts, found_blocks, strict=True):
        rows = query_order[first : first + len(found)]
        valid = (found >= 0) & (scores > 0)
        idx[rows] = np.where(valid, order[np.maximum(found, 0)], -1)
        sim[rows] = np.where(valid, scores, 0.0)
    logger.debug("ann: search in %.1fs", time.perf_counter() - clock)
    return idx, sim


def _nearest_lists(
    index, factors: np.ndarray, source: np.ndarray | None, probes: int
) -> np.ndarray:
    """Each row's ``probes`` nearest centroids (int32), searched ANN_GROUP_ROWS rows at a time:
    faiss's int64 labels and float distances for 10M users at once are 1.4 GB, and a
    memory-mapped ``source`` gives its pages back as they are read (5 GB at 10M users)."""
    nearest = np.empty((len(factors), probes), dtype=np.int32)
    step = 16 * ANN_GROUP_ROWS
    for start in range(0, len(factors), step):
        nearest[start : start + step] = index.search(factors[start : start + step], probes)[1]
        if source is not None:
            release_rows(source, start, start + step)
    return nearest


def _grouped(factors: np.ndarray, source: np.ndarray, position: np.ndarray) -> np.ndarray:
    """``factors`` with row ``i`` moved to ``position[i]``, read in file order: rows of a
    memory-mapped ``source`` are given back as they are copied, so the map and the copy are
    never both resident."""
    grouped = np.empty_like(factors)
    for start in range(0, len(factors), ANN_GROUP_ROWS):
        stop = start + ANN_GROUP_ROWS
        grouped[position[start:stop]] = factors[start:stop]
        release_rows(source, start, stop)
    return grouped


def _search_here(search: _ProbeSearch, firsts: range) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    # Counted before torch is set to one thread: counted inside, it is always one worker.
    workers = worker_threads()
    with _torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(search, firsts)


def _search_on_ray(
    search: _ProbeSearch, firsts: range, address: str | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The same search as Ray tasks over blocks of users; the index (the ordered vectors, the
    probes, the lists' starts) is put in the object store once and shared by every task."""
    from encore.ray_cluster import import_ray, join_ray

    ray = import_ray()
    started = join_ray(address)
    try:
        index = ray.put(search)
        task = ray.remote(num_cpus=1)(_search_block)
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        # A few tasks per CPU: scheduling a task costs more than searching one query batch.
        per_task = max(1, math.ceil(len(firsts) / (4 * cpus)))
        blocks = [list(firsts[i : i + per_task]) for i in range(0, len(firsts), per_task)]
        for pending in [task.remote(index, block) for block in blocks]:
            yield from ray.get(pending)
    finally:
        if started:
            ray.shutdown()


def _search_block(search: _ProbeSearch, firsts: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    with _torch_threads(1):
        return [search(first) for first in firsts]


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
    starts: np.ndarray  # first row of each list
    width: int
    batch: int  # queries per call
    queries: torch.Tensor | None  # normalized query vectors grouped by list; None: ``ordered``
    probes: np.ndarray  # lists probed per query, its own list first
    positions: np.ndarray | None  # each query's row of ``ordered``; None: the same row

    def __call__(self, first: int) -> tuple[np.ndarray, np.ndarray]:
        every = self.ordered if self.queries is None else self.queries
        last = min(len(every), first + self.batch)
        n_rows = last - first
        queries = every[first:last]
        own = np.arange(first, last) if self.positions is None else self.positions[first:last]
        pack = _ScoreKeys.plan(len(self.ordered), self.batch)
        floor = np.full(n_rows, -np.inf, dtype=np.float32)
        best = np.zeros(0, dtype=np.int64)
        # The own list, the second nearest, then the rest a few at a time: floors rise early
        # (the second list still holds many better scores), and the survivors of one stage,
        # kept as sort keys, stay a few per user and list. All the rest at once held ~5 GB
        # per thread for a batch of 400k users at 10M (killed by the OOM killer at 22 GB).
        # Each stage meets each list with at least ANN_QUERIES_PER_LIST rows on average.
        n_probes = self.probes.shape[1]
        n_lists = len(self.starts) - 1
        step = max(1, math.ceil(ANN_QUERIES_PER_LIST * n_lists / max(n_rows, 1)))
        stages = [(0, 1), (1, 2)] + [(p, min(n_probes, p + step)) for p in range(2, n_probes, step)]
        for lo_p, hi_p in stages:
            lists = self.probes[first:last, lo_p:hi_p].ravel()
            if len(lists) == 0:
                break
            by_list = np.argsort(lists, kind="stable")
            keys, held = [best], len(best)
            # Survivors are cut down to each row's best whenever they pile up: at 10M users a
            # stage's survivors of 400k users held ~4.5 GB per thread before the cut.
            limit = max(ANN_COMPACT_KEYS, 3 * n_rows * self.width)
            for group in np.split(by_list, np.flatnonzero(np.diff(lists[by_list])) + 1):
                lo, hi = int(self.starts[lists[group[0]]]), int(self.starts[lists[group[0]] + 1])
                for a, b in _chunks(0, len(group), hi - lo):
                    rows = group[a:b] // (hi_p - lo_p)
                    scores = queries[torch.from_numpy(rows)] @ self.ordered[lo:hi].T
                    if lo_p == 0:  # one more: the user itself is among these scores
                        floor[rows] = _score_floor(scores, self.width + 1)
                    found = pack.survivors(rows, own, lo, scores.numpy(), floor[rows])
                    keys.append(found)
                    held += len(found)
                    if held > limit:
                        best = pack.first(_sorted(keys), n_rows, self.width)
                        floor = np.maximum(floor, pack.floor(best, n_rows, self.width))
                        keys, held = [best], len(best)
            best = pack.first(_sorted(keys), n_rows, self.width)
            floor = np.maximum(floor, pack.floor(best, n_rows, self.width))
        return pack.top(best, n_rows, self.width)


@dataclass(frozen=True)
class _ScoreKeys:
    """(batch row, score, position) packed in an int64 that sorts rows, then best first."""

    position_bits: int
    score_bits: int

    @classmethod
    def plan(cls, n: int, batch: int) -> _ScoreKeys:
        position_bits = max(1, (n - 1).bit_length())
        return cls(position_bits, 63 - position_bits - (batch - 1).bit_length())

    @property
    def scale(self) -> float:
        # Scores in [-1, 1] to levels 0..2 scale; an integer scale decodes 0 and 1 exactly.
        return float((1 << (self.score_bits - 1)) - 1)

    @property
    def row_shift(self) -> int:
        return self.position_bits + self.score_bits

    def survivors(
        self, rows: np.ndarray, own: np.ndarray, lo: int, scores: np.ndarray, floor: np.ndarray
    ) -> np.ndarray:
        """Keys of the ``scores`` at or above their row's ``floor``, but each user's own.

        Row ``i`` scores batch row ``rows[i]`` (index position ``own[rows[i]]``); column ``j``
        is position ``lo + j``.
        """
        # numpy's compare and flatnonzero are ~4x cheaper here than torch's nonzero.
        hits = np.flatnonzero(scores >= floor[:, None])
        row, col = np.divmod(hits, scores.shape[1])
        other = own[rows[row]] != col + lo
        hits, row, col = hits[other], row[other], col[other]
        level = np.rint(np.clip(1.0 - scores.ravel()[hits].astype(np.float64), 0, 2) * self.scale)
        return (
            (rows[row].astype(np.int64) << self.row_shift)
            | (level.astype(np.int64) << self.position_bits)
            | (col + lo)
        )

    def first(self, keys: np.ndarray, n_rows: int, width: int) -> np.ndarray:
        """The first ``width`` of every row's sorted keys (temporaries the size of the output,
        not of ``keys``: a row's keys start where its row number does)."""
        bounds = np.arange(n_rows, dtype=np.int64) << self.row_shift
        starts = np.r_[np.searchsorted(keys, bounds), len(keys)]
        kept = np.minimum(np.diff(starts), width)
        offsets = np.cumsum(kept) - kept
        return keys[np.repeat(starts[:-1] - offsets, kept) + np.arange(int(kept.sum()))]

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


def _sorted(keys: list[np.ndarray]) -> np.ndarray:
    merged = np.concatenate(keys)
    keys.clear()  # the pieces go before the sort: only the merged copy stays
    merged.sort()  # in place: np.sort would hold a second copy
    return merged


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


def worker_threads() -> int:
    """Worker threads for the pairing: the torch setting, which the caller may have lowered."""
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))
