"""The pairing's neighbour search on Ray: blocks of users as Ray tasks against an index put in
the object store once, giving the local search's neighbours. Without Ray installed these skip,
under CI=true they fail."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.sparse as sp

from tests.conftest import IN_CI
from tests.test_pairing_scale import clustered_vectors
from training.ann import ann_neighbours
from training.pairing import PairingParams, pair_users


def _need_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        message = "Ray is not installed: `uv sync --extra ray`"
        if IN_CI:
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)


def test_the_neighbours_found_on_ray_are_the_local_ones():
    _need_ray()
    vectors = clustered_vectors(n=6000)
    local_idx, local_sim = ann_neighbours(vectors, 20)
    ray_idx, ray_sim = ann_neighbours(vectors, 20, ray=True)  # starts and stops a local Ray
    same = (ray_idx == local_idx).all(axis=1)
    assert same.mean() >= 0.99, same.mean()
    # The same code on the same index: in practice every user, and the same similarities.
    np.testing.assert_array_equal(ray_idx, local_idx)
    np.testing.assert_array_equal(ray_sim, local_sim)


def test_pair_users_on_ray_gives_the_local_pairings():
    _need_ray()
    rng = np.random.default_rng(3)
    vectors = clustered_vectors(n=3000)
    rows = np.repeat(np.arange(3000), 8)
    cols = rng.integers(0, 400, len(rows))
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(3000, 400))
    matrix.sum_duplicates()
    here = pair_users(matrix, PairingParams(method="ann"), user_factors=vectors)
    there = pair_users(matrix, PairingParams(method="ann", engine="ray"), user_factors=vectors)
    for name in ("indptr", "items", "support", "neighbours"):
        np.testing.assert_array_equal(getattr(there, name), getattr(here, name), err_msg=name)
