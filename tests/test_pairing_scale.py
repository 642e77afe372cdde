"""The scalable pairing paths against plain dense references, on small random data."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from training.matrix import low_rank_factors, popularity, row_normalize
from training.pairing import ann_neighbours, candidates_from_neighbours


def clustered_vectors(n: int = 3000, dim: int = 24, clusters: int = 30) -> np.ndarray:
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((clusters, dim))
    vectors = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    vectors[:20] = vectors[20:40]  # exact duplicates: ties
    vectors[40:45] = 0.0  # users without factors
    return vectors.astype(np.float32)


def test_ann_neighbours_agree_with_brute_force():
    vectors = clustered_vectors()
    k = 10
    idx, sim = ann_neighbours(vectors, k)
    assert idx.shape == sim.shape == (len(vectors), k)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    cosine = unit @ unit.T
    np.fill_diagonal(cosine, -np.inf)
    kth_best = -np.sort(-cosine, axis=1)[:, k - 1]
    live = np.linalg.norm(vectors, axis=1) > 0
    assert (idx[~live] == -1).all() and (sim[~live] == 0).all()
    rows = np.flatnonzero(live)
    found = idx[rows]
    assert (found != rows[:, None]).all()  # never the user itself
    assert (np.diff(sim[rows], axis=1) <= 1e-7).all()  # best first
    valid = found >= 0
    true = cosine[np.repeat(rows, k), np.maximum(found, 0).ravel()].reshape(found.shape)
    np.testing.assert_allclose(sim[rows][valid], true[valid], atol=1e-5)
    # Tie-aware recall: returned neighbours at least as close as the true k-th.
    recall = np.minimum(1, (np.where(valid, true, -2) >= kth_best[rows, None] - 1e-5).sum(1) / k)
    assert recall.mean() > 0.97
    again = ann_neighbours(vectors, k)
    np.testing.assert_array_equal(again[0], idx)
    np.testing.assert_array_equal(again[1], sim)


def test_ann_search_runs_on_every_worker_thread_with_the_same_neighbours(monkeypatch):
    """The search's batches run on worker_threads() threads (each product on one torch
    thread), and the neighbours do not depend on how many."""
    import concurrent.futures

    import torch

    import training.ann as ann

    vectors = clustered_vectors()
    monkeypatch.setattr(ann, "ANN_QUERY_BATCH", 256)
    monkeypatch.setattr(ann, "ANN_QUERIES_PER_LIST", 2)
    monkeypatch.setattr(ann.os, "cpu_count", lambda: 4)
    pools: list[int] = []

    class Recorded(concurrent.futures.ThreadPoolExecutor):
        def __init__(self, max_workers=None, **kwargs):
            pools.append(max_workers)
            super().__init__(max_workers=max_workers, **kwargs)

    monkeypatch.setattr(ann, "ThreadPoolExecutor", Recorded)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = ann.ann_neighbours(vectors, 10)
        torch.set_num_threads(3)
        shared = ann.ann_neighbours(vectors, 10)
        assert torch.get_num_threads() == 3  # given back after the search
    finally:
        torch.set_num_threads(before)
    assert pools == [1, 3]
    np.testing.assert_array_equal(alone[0], shared[0])
    np.testing.assert_array_equal(alone[1], shared[1])


def dense_candidates(matrix, nbr_idx, nbr_sim, cap):
    """The rule written out densely: support, counts, unseen, support then popularity order."""
    held = (matrix.toarray() > 0).astype(np.float64)
    n_users = held.shape[0]
    weights, ones = np.zeros((n_users, n_users)), np.zeros((n_users, n_users))
    for user in range(n_users):
        for other, s in zip(nbr_idx[user], nbr_sim[user], strict=True):
            if other >= 0:
                weights[user, other] += s
                ones[user, other] += 1
    support, counts = weights @ held, ones @ held
    pop = popularity(matrix)
    rank = np.empty(len(pop), np.int64)
    rank[np.argsort(-pop, kind="stable")] = np.arange(len(pop))
    rows = []
    for user in range(n_users):
        offered = np.flatnonzero((counts[user] > 0) & (held[user] == 0))
        offered = offered[np.lexsort((rank[offered], -support[user, offered]))][:cap]
        items = list(offered)
        if 0 < len(items) < cap:
            free = [i for i in np.argsort(rank) if held[user, i] == 0 and i not in items]
            items += free[: cap - len(items)]
        sup = [support[user, i] if j < len(offered) else 0.0 for j, i in enumerate(items)]
        cnt = [counts[user, i] if j < len(offered) else 0 for j, i in enumerate(items)]
        rows.append((items, sup, cnt))
    return rows


def test_candidates_agree_with_a_dense_reference():
    rng = np.random.default_rng(3)
    n_users, n_items, k, cap = 200, 60, 6, 12
    matrix = sp.random(n_users, n_items, density=0.06, random_state=4, format="csr")
    matrix.data = rng.uniform(1, 5, matrix.nnz)
    nbr_idx = rng.integers(0, n_users, (n_users, k))
    nbr_idx[nbr_idx == np.arange(n_users)[:, None]] = -1
    nbr_idx[rng.random((n_users, k)) < 0.2] = -1
    nbr_sim = np.where(nbr_idx >= 0, rng.uniform(0.01, 1.0, (n_users, k)), 0).astype(np.float32)
    pairs = candidates_from_neighbours(matrix, nbr_idx, nbr_sim, cap, block_users=64)
    expected = dense_candidates(matrix, nbr_idx, nbr_sim, cap)
    for user, (items, sup, cnt) in enumerate(expected):
        span = slice(pairs.indptr[user], pairs.indptr[user + 1])
        assert pairs.items[span].tolist() == items, user
        np.testing.assert_allclose(pairs.support[span], sup, rtol=1e-5, atol=1e-6)
        assert pairs.neighbours[span].tolist() == cnt, user


def test_low_rank_factors_are_near_the_truncated_svd_and_repeatable():
    matrix = sp.random(400, 150, density=0.05, random_state=2, format="csr", dtype=np.float32)
    for shaped in (matrix, matrix.T.tocsr()):  # both the tall and the wide code path
        users, items = low_rank_factors(shaped, dim=20, seed=7)
        pop = np.maximum(popularity(shaped), 1).astype(np.float32)
        target = (row_normalize(shaped) @ sp.diags(pop**-0.3)).toarray()
        singular = np.linalg.svd(target, compute_uv=False)
        optimal = np.sqrt((singular[20:] ** 2).sum())
        assert np.linalg.norm(target - users @ items.T) < 1.02 * optimal
        np.testing.assert_allclose(items.T @ items, np.eye(20), atol=1e-5)
        again = low_rank_factors(shaped, dim=20, seed=7)
        np.testing.assert_array_equal(again[0], users)
        np.testing.assert_array_equal(again[1], items)


def test_low_rank_factors_in_row_blocks_equal_one_product(monkeypatch):
    """The long side is multiplied in blocks of rows (10M users would otherwise hold a 5 GB
    intermediate): the factors are those of one product, up to float32 summation order."""
    import training.matrix

    matrix = sp.random(900, 120, density=0.05, random_state=3, format="csr", dtype=np.float32)
    for shaped in (matrix, matrix.T.tocsr()):
        whole = low_rank_factors(shaped, dim=16, seed=1)
        monkeypatch.setattr(training.matrix, "LONG_BLOCK_ROWS", 128)  # 8 blocks
        blocked = low_rank_factors(shaped, dim=16, seed=1)
        monkeypatch.undo()
        for a, b in zip(whole, blocked, strict=True):
            np.testing.assert_allclose(a, b, atol=2e-5)
