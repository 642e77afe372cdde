"""The item-item candidate generator: what a user's own playlists point to, beside what the
user's neighbours hold.

Two models over the binary user x playlist matrix, both restricted to playlists at least two
users hold (a playlist held by one user co-occurs with nothing else):

- **EASE** (Steck, 2019): ``B = I - P / diag(P)`` with ``P = (XᵀX + Λ)⁻¹`` and a zero
  diagonal, a user's scores ``x_u B`` (``x_u`` the user's log-weighted row). Dense: used
  while the catalog fits (``ease_max_items``). ``Λ = λI + p/(1-p) diag(XᵀX)``: besides
  EASE's λ, each playlist is regularised in proportion to how many users hold it, which is
  the closed form of an autoencoder trained with emphasized dropout ``p`` (EDLAE, Steck,
  NeurIPS 2020); ``p = 0`` is EASE.
- **item-KNN**: each playlist's ``knn_neighbours`` nearest playlists by cosine, from blocked
  sparse products; a user's scores ``x_u S`` (log-weighted too). Sparse: used above that size.

Both score a block of users at a time (:meth:`ItemModel.block`): the top ``count`` unseen
playlists with their scores, and a lookup of the score of any (user, playlist) pair, which the
ranker takes as a feature of every candidate.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from training.ann import worker_threads
from training.matrix import _csr_tensor, popularity

logger = logging.getLogger("encore.items")

ITEM_METHODS = ("auto", "ease", "knn", "none")
MIN_ITEM_USERS = 2
KNN_BLOCK_ITEMS = 4096
# EASE's regularisation is chosen on the inner split by walking these ladders from their
# start (λ first, then EDLAE's dropout p at the best λ), a step at a time while the held-out
# recall@10 rises. Where the best λ falls depends on the data (Last.fm: 50, MovieLens 100k:
# 200); a fixed coarse grid searched λ at p = 0 first missed it on both (-0.003 and -0.004 of
# the item model's recall@10 on their test splits). Five to seven inverses in all.
EASE_LAMBDAS = (6.25, 12.5, 25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0)
EASE_DROPOUTS = (0.0, 0.33, 0.5, 0.67, 0.8)
EASE_START = (100.0, 0.5)
TUNING_CUTOFF = 10  # the held-out recall of each pair's top this many picks
TUNING_USERS = 20_000  # held-out users the choice is measured on, at most
TUNING_BLOCK = 2048


@dataclass(frozen=True)
class ItemParams:
    method: str = "auto"  # auto | ease | knn | none
    count: int = 50  # candidates per user from this generator
    ease_lambda: float | None = None  # None: chosen on an inner split (tune_item_model)
    # EDLAE's dropout; None: chosen on the inner split (0 in bundles trained before it).
    ease_dropout: float | None = None
    ease_max_items: int = 12_000  # above this many playlists (held by 2+ users): item-KNN
    knn_neighbours: int = 100
    # A user's row is scored with its log weights (False: as 0/1, as bundles trained before
    # 2026-12-07 were; their rankers learnt on those scores).
    weighted_rows: bool = True

    def resolve(self, kept_items: int) -> str:
        if self.method not in ITEM_METHODS:
            raise ValueError(f"unknown item method {self.method!r}; use {', '.join(ITEM_METHODS)}")
        if self.method != "auto":
            return self.method
        return "ease" if kept_items <= self.ease_max_items else "knn"


@dataclass(frozen=True)
class BlockScores:
    """A block of users' item-model scores: their best unseen playlists and a lookup."""

    top_items: np.ndarray  # (n, count) item codes, -1 pads
    top_scores: np.ndarray  # (n, count) float32
    _dense: torch.Tensor | None  # (n, kept) scores (EASE)
    _sparse: sp.csr_matrix | None  # (n, kept) scores (item-KNN)
    _column: np.ndarray  # item code -> column among the kept playlists, -1 if not kept

    def lookup(self, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """The score of each (block row, item code) pair; 0 for a playlist the model skips."""
        column = np.where(items >= 0, self._column[np.maximum(items, 0)], -1)
        out = np.zeros(len(rows), dtype=np.float32)
        ok = column >= 0
        if self._dense is not None:
            out[ok] = self._dense[torch.from_numpy(rows[ok]), torch.from_numpy(column[ok])].numpy()
        elif self._sparse is not None and self._sparse.nnz:
            width = self._sparse.shape[1]
            matrix = self._sparse
            keys = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))
            keys = keys * width + matrix.indices
            wanted = rows[ok].astype(np.int64) * width + column[ok]
            at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
            out[ok] = np.where(keys[at] == wanted, matrix.data[at], 0.0)
        return out


@dataclass
class ItemModel:
    """A fitted item-item model over the ``kept`` playlists (item codes)."""

    method: str
    kept: np.ndarray  # item codes the model scores
    weights: torch.Tensor | sp.csr_matrix  # (kept, kept): EASE's B, or item-KNN's S
    count: int
    n_items: int
    seconds: float = 0.0
    ease_lambda: float = float("nan")  # EASE's λ (nan for item-KNN)
    ease_dropout: float = 0.0  # EDLAE's p (0: plain EASE)
    weighted_rows: bool = True  # see ItemParams.weighted_rows

    def block(self, seen: sp.csr_matrix) -> BlockScores:
        """Scores of a block of users, given their rows of the interaction matrix."""
        column = np.full(self.n_items, -1, dtype=np.int64)
        column[self.kept] = np.arange(len(self.kept))
        # The model is fitted on what users hold (binary); a user's row is scored with its
        # log weights, so the playlists the user played most point the strongest. On
        # Last.fm's split this adds about 0.001 to EASE's recall@10 alone and 0.004 to the
        # ranker's coverage@10 (three seeds); on binary data it changes nothing.
        rows = seen[:, self.kept]
        binary = _binary(rows)
        weighted = rows.tocsr().astype(np.float32, copy=False) if self.weighted_rows else binary
        count = min(self.count, len(self.kept))
        top_items = np.full((seen.shape[0], self.count), -1, dtype=np.int64)
        top_scores = np.zeros((seen.shape[0], self.count), dtype=np.float32)
        if isinstance(self.weights, torch.Tensor):
            dense = _csr_tensor(weighted) @ self.weights if binary.nnz else None
            if dense is None:
                dense = torch.zeros(seen.shape[0], len(self.kept))
            if count:
                masked = dense.clone()
                rows = np.repeat(np.arange(binary.shape[0]), np.diff(binary.indptr))
                masked[
                    torch.from_numpy(rows), torch.from_numpy(binary.indices.astype(np.int64))
                ] = -torch.inf
                values, where = torch.topk(masked, count, dim=1)
                good = torch.isfinite(values) & (values > 0)
                top_items[:, :count] = np.where(good, self.kept[where.numpy()], -1)
                top_scores[:, :count] = np.where(good, values.numpy(), 0.0)
            return BlockScores(top_items, top_scores, dense, None, column)
        scores = (weighted @ self.weights).tocsr()
        # Seen playlists out: their products are kept only where the user has not got them.
        scores = (scores - scores.multiply(binary)).tocsr()
        scores.eliminate_zeros()
        scores.sort_indices()
        if count and scores.nnz:
            row = np.repeat(np.arange(scores.shape[0], dtype=np.int64), np.diff(scores.indptr))
            order = np.lexsort((-scores.data, row))
            row_sorted = row[order]
            rank = np.arange(len(order)) - np.searchsorted(row_sorted, row_sorted)
            keep = rank < count
            top_items[row_sorted[keep], rank[keep]] = self.kept[scores.indices[order[keep]]]
            top_scores[row_sorted[keep], rank[keep]] = scores.data[order[keep]]
        return BlockScores(top_items, top_scores, None, scores, column)


def fit_item_model(matrix: sp.csr_matrix, params: ItemParams = ItemParams()) -> ItemModel | None:
    """The item-item model of the (user x playlist) matrix, or None when the method is none or
    no playlist is held by two users. EASE needs ``params.ease_lambda`` and ``ease_dropout``
    set (see :func:`tune_item_model`); unset, they are ``EASE_START``'s λ and 0."""
    basis = _Basis.of(matrix, params)
    if basis is None:
        return None
    lam = EASE_START[0] if params.ease_lambda is None else params.ease_lambda
    return basis.model(params, lam, params.ease_dropout or 0.0)


def tune_item_model(
    matrix: sp.csr_matrix,
    params: ItemParams,
    held_users: np.ndarray,
    held_items: np.ndarray,
    *,
    seed: int = 0,
) -> tuple[ItemModel | None, dict[tuple[float, float], float]]:
    """The item model of ``matrix`` with EASE's λ and EDLAE's dropout chosen (unless set) as
    the pair whose top ``TUNING_CUTOFF`` picks hold most of the held-out rows ``(held_users,
    held_items)`` (recall, averaged over at most ``TUNING_USERS`` of those users): a walk along
    ``EASE_LAMBDAS`` from ``EASE_START``, then along ``EASE_DROPOUTS`` at the best λ (see
    :func:`_walk`). Returns the model and the recall of each (λ, dropout) tried."""
    basis = _Basis.of(matrix, params)
    if basis is None:
        return None, {}
    lam = EASE_START[0] if params.ease_lambda is None else params.ease_lambda
    dropout = EASE_START[1] if params.ease_dropout is None else params.ease_dropout
    if basis.method != "ease" or None not in (params.ease_lambda, params.ease_dropout):
        return basis.model(params, lam, dropout), {}
    users = np.unique(held_users)
    if len(users) > TUNING_USERS:
        users = np.sort(np.random.default_rng(seed).choice(users, TUNING_USERS, replace=False))
    n_items = matrix.shape[1]
    held_keys = np.unique(held_users.astype(np.int64) * n_items + held_items)
    counts = np.bincount(held_users, minlength=matrix.shape[0])[users]
    recall: dict[tuple[float, float], float] = {}
    models: dict[tuple[float, float], ItemModel] = {}

    def measure(pair: tuple[float, float]) -> float:
        if pair not in recall:
            model = basis.model(params, *pair)
            found = np.zeros(len(users))
            for start in range(0, len(users), TUNING_BLOCK):
                some = users[start : start + TUNING_BLOCK]
                top = model.block(matrix[some]).top_items[:, :TUNING_CUTOFF]
                hits = np.isin(some[:, None] * n_items + top, held_keys) & (top >= 0)
                found[start : start + len(some)] = hits.sum(axis=1)
            recall[pair] = float(np.mean(found / np.maximum(counts, 1)))
            # Only the best so far is kept: at 12,000 playlists a model is 576 MB.
            if all(recall[pair] > recall[other] for other in models):
                models.clear()
                models[pair] = model
        return recall[pair]

    if params.ease_lambda is None:
        lam = _walk(EASE_LAMBDAS, lam, lambda value: measure((value, dropout)))
    if params.ease_dropout is None:
        dropout = _walk(EASE_DROPOUTS, dropout, lambda value: measure((lam, value)))
    logger.debug("EASE lambda %s, dropout %s chosen; recall: %s", lam, dropout, recall)
    (best,) = models.values()
    return best, recall


def _walk(ladder: tuple[float, ...], start: float, score) -> float:
    """The rung of ``ladder`` a hill climb from ``start`` ends on: one step up and one down
    from it, then on in the direction that rose, while the score keeps rising (ties stay)."""
    here = ladder.index(start) if start in ladder else None
    if here is None:  # a value set off the ladder is measured alone
        score(start)
        return start
    best = score(ladder[here])
    for step in (1, -1):
        moved = False
        at = here + step
        while 0 <= at < len(ladder):
            value = score(ladder[at])
            if value <= best:
                break
            here, best, moved = at, value, True
            at += step
        if moved:
            break
    return ladder[here]


@dataclass(frozen=True)
class _Basis:
    """What every model of one matrix shares: the playlists kept, their binary columns and,
    for EASE, their Gram matrix (each λ and dropout only changes its diagonal)."""

    method: str
    kept: np.ndarray
    n_items: int
    binary: sp.csr_matrix
    gram: np.ndarray | None
    seconds: float

    @classmethod
    def of(cls, matrix: sp.csr_matrix, params: ItemParams) -> _Basis | None:
        clock = time.perf_counter()
        pop = popularity(matrix)
        kept = np.flatnonzero(pop >= MIN_ITEM_USERS)
        method = params.resolve(len(kept))
        if method == "none" or len(kept) == 0 or params.count == 0:
            return None
        binary = _binary(matrix[:, kept])
        gram = (binary.T @ binary).toarray().astype(np.float32) if method == "ease" else None
        return cls(method, kept, matrix.shape[1], binary, gram, time.perf_counter() - clock)

    def model(self, params: ItemParams, lam: float, dropout: float) -> ItemModel:
        clock = time.perf_counter()
        if self.method == "knn":
            weights = knn_weights(self.binary, params.knn_neighbours)
            lam, dropout = float("nan"), 0.0
        else:
            weights = ease_weights(self.gram, lam, dropout)
        seconds = self.seconds + time.perf_counter() - clock
        logger.debug(
            "%s over %d playlists (λ %s, p %s) in %.1fs",
            self.method,
            len(self.kept),
            lam,
            dropout,
            seconds,
        )
        return ItemModel(
            self.method,
            self.kept,
            weights,
            params.count,
            self.n_items,
            seconds,
            lam,
            dropout,
            weighted_rows=params.weighted_rows,
        )


def ease_weights(gram: np.ndarray, lam: float, dropout: float = 0.0) -> torch.Tensor:
    """EASE's ``B`` from the Gram matrix ``XᵀX`` of a binary matrix: ``I - P / diag(P)``,
    ``P = (XᵀX + λI + p/(1-p) diag(XᵀX))⁻¹`` (``p`` EDLAE's dropout; 0 is EASE)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"EASE dropout must be in [0, 1), got {dropout!r}")
    gram = torch.tensor(gram, dtype=torch.float32)  # a copy: the caller's serves every λ
    gram.diagonal().mul_(1.0 + dropout / (1.0 - dropout)).add_(lam)
    # Symmetric positive definite: a Cholesky inverse is half the work of a general one.
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram))
    del gram
    weights = inverse.div_(-inverse.diagonal().clone())
    weights.diagonal().zero_()
    return weights


def knn_weights(binary: sp.csr_matrix, k: int, *, workers: int | None = None) -> sp.csr_matrix:
    """Each playlist's ``k`` nearest playlists by cosine, as a sparse (kept x kept) matrix:
    row ``j`` holds the similarities of playlist ``j``'s neighbours. Blocks of playlists are
    multiplied on ``workers`` threads (scipy's sparse product releases the GIL; default: the
    pairing's worker threads)."""
    n = binary.shape[1]
    workers = workers or worker_threads()
    norms = np.sqrt(np.asarray(binary.sum(axis=0), dtype=np.float64).ravel())
    scaled = (binary @ sp.diags((1.0 / np.maximum(norms, 1e-12)).astype(np.float32))).tocsc()
    transposed = scaled.T.tocsr()
    # A block's product and its sort are the stage's memory (at 10M users x 200k playlists,
    # ~5 GB for 4,096 playlists): with more blocks in flight each is smaller, so the peak
    # stays that of one block of KNN_BLOCK_ITEMS.
    size = max(1, KNN_BLOCK_ITEMS // workers)

    def block(start: int) -> sp.csr_matrix:
        stop = min(n, start + size)
        product = (transposed[start:stop] @ scaled).tocsr()  # (items of the block) x all items
        product.setdiag(0, k=start)
        product.eliminate_zeros()
        return _top_per_row(product, k)

    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(block, range(0, n, size)))
    return sp.vstack(parts).tocsr().astype(np.float32)


def _top_per_row(matrix: sp.csr_matrix, k: int) -> sp.csr_matrix:
    row = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))
    order = np.lexsort((-matrix.data, row))
    rank = np.arange(len(order)) - np.searchsorted(row[order], row[order])
    keep = order[rank < k]
    return sp.csr_matrix(
        (matrix.data[keep], (row[keep], matrix.indices[keep])), shape=matrix.shape
    ).tocsr()


def _binary(matrix: sp.csr_matrix) -> sp.csr_matrix:
    binary = matrix.tocsr(copy=True).astype(np.float32)
    binary.data[:] = 1.0
    return binary
