"""The quality protocol (docs/architecture.md), checked on examples worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.protocol import holdout_mask, ranking_metrics

# Users A = 7 (5 rows), B = 3 (4 rows), C = 42 (10 rows), interleaved in file order.
A, B, C = 7, 3, 42
FILE_ORDER = [C, A, B, C, C, A, B, C, A, C, B, C, C, A, C, B, C, C, A]
# numpy.random.RandomState(0).permutation(19), written out: the protocol pins this stream.
PERMUTATION = [10, 1, 8, 18, 14, 16, 6, 4, 2, 5, 13, 9, 7, 17, 11, 3, 0, 15, 12]


def test_the_permutation_is_the_one_the_protocol_names():
    assert np.random.RandomState(0).permutation(19).tolist() == PERMUTATION


def test_holdout_mask_by_hand():
    # Shuffled order of the rows and their users:
    #   10 B, 1 A, 8 A, 18 A, 14 C, 16 C, 6 B, 4 C, 2 B, 5 A, 13 A, 9 C, ...
    # A: 5 rows, holds floor(0.2 * 5) = 1: its first shuffled row, 1.
    # B: 4 rows (< 5), holds none.
    # C: 10 rows, holds floor(0.2 * 10) = 2: its first two shuffled rows, 14 and 16.
    held = holdout_mask(np.array(FILE_ORDER))
    assert held.dtype == bool
    assert np.flatnonzero(held).tolist() == [1, 14, 16]


def test_holdout_mask_does_not_depend_on_code_values():
    relabelled = np.array([{A: 0, B: 1, C: 2}[u] for u in FILE_ORDER])
    assert np.flatnonzero(holdout_mask(relabelled)).tolist() == [1, 14, 16]


def reference_holdout(users: list[int]) -> set[int]:
    """The protocol's words as a plain loop."""
    counts: dict[int, int] = {}
    for user in users:
        counts[user] = counts.get(user, 0) + 1
    taken: dict[int, int] = {}
    held = set()
    for row in np.random.RandomState(0).permutation(len(users)):
        user = users[row]
        quota = counts[user] // 5 if counts[user] >= 5 else 0  # floor(0.2 n), exactly
        if taken.get(user, 0) < quota:
            taken[user] = taken.get(user, 0) + 1
            held.add(int(row))
    return held


def test_holdout_mask_matches_the_plain_reading_on_many_sizes():
    rng = np.random.default_rng(5)
    sizes = np.arange(1, 41)  # users with 1..40 rows: every floor(0.2 n) boundary
    users = rng.permutation(np.repeat(np.arange(len(sizes)) * 11 + 5, sizes)).tolist()
    held = holdout_mask(np.array(users))
    assert set(np.flatnonzero(held).tolist()) == reference_holdout(users)
    per_user = {u: int(held[np.array(users) == u].sum()) for u in set(users)}
    assert per_user == {
        u: (n // 5 if n >= 5 else 0)
        for u, n in zip(np.arange(len(sizes)) * 11 + 5, sizes, strict=True)
    }


def test_holdout_mask_other_seed_differs():
    users = np.repeat(np.arange(50), 10)
    assert not np.array_equal(holdout_mask(users), holdout_mask(users, seed=1))
    assert holdout_mask(users, seed=1).sum() == holdout_mask(users).sum() == 100


def test_ranking_metrics_by_hand():
    d = [1 / math.log2(rank + 1) for rank in range(1, 13)]  # discount of ranks 1..12
    top = np.array(
        [
            # user 0 holds out {5, 9}: hits at ranks 1 and 4.
            [5, 1, 2, 9, 3, 4, 6, 7, 8, 10, 11, 12],
            # user 1 holds out 12 items (0..11): hits at ranks 2, 3 and 10;
            # the hit at rank 11 is past the cutoff and does not count.
            [20, 0, 1, 21, 22, 23, 24, 25, 26, 2, 3, 27],
            # user 2 holds out nothing: not evaluated, whatever its list.
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            # user 3 holds out {7}: a short list padded with -1, hit at rank 1.
            [7, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1],
            # user 4 holds out {4}: an empty list (-1 only) never hits.
            [-1] * 12,
        ]
    )
    held = [[5, 9], list(range(12)), [], [7], [4]]
    indptr = np.cumsum([0] + [len(h) for h in held])
    items = np.array([item for h in held for item in h])

    metrics = ranking_metrics(top, indptr, items)

    recall = [2 / 2, 3 / 10, 1 / 1, 0 / 1]  # hits / min(10, held out)
    ndcg = [
        (d[0] + d[3]) / (d[0] + d[1]),  # ideal: two hits at ranks 1, 2
        (d[1] + d[2] + d[9]) / sum(d[:10]),  # ideal: ten hits at ranks 1..10
        d[0] / d[0],
        0.0,
    ]
    assert metrics.users == 4
    assert metrics.recall_at_10 == pytest.approx(sum(recall) / 4)
    assert metrics.ndcg_at_10 == pytest.approx(sum(ndcg) / 4)
    assert metrics.as_dict() == {
        "recall@10": round(sum(recall) / 4, 5),
        "ndcg@10": round(sum(ndcg) / 4, 5),
        "users": 4,
    }


def test_ranking_metrics_rank_discount_and_cutoff():
    held = np.array([0, 1])
    early = ranking_metrics(np.array([[0, 1] + [9] * 8]), np.array([0, 2]), held)
    late = ranking_metrics(np.array([[9] * 8 + [0, 1]]), np.array([0, 2]), held)
    beyond = ranking_metrics(np.array([[9] * 10 + [0, 1]]), np.array([0, 2]), held)
    assert early.recall_at_10 == late.recall_at_10 == 1.0
    assert early.ndcg_at_10 == pytest.approx(1.0)
    assert late.ndcg_at_10 == pytest.approx(
        (1 / math.log2(10) + 1 / math.log2(11)) / (1 + 1 / math.log2(3))
    )
    assert beyond.recall_at_10 == beyond.ndcg_at_10 == 0.0


def test_ranking_metrics_with_nobody_held_out():
    metrics = ranking_metrics(np.full((3, 10), -1), np.zeros(4, dtype=np.int64), np.array([]))
    assert (metrics.recall_at_10, metrics.ndcg_at_10, metrics.users) == (0.0, 0.0, 0)


def test_repeated_pairs_are_merged_so_a_held_out_pair_is_never_trained_on():
    from training.matrix import merge_repeats

    rng = np.random.default_rng(4)
    users = rng.integers(0, 40, 3000)
    items = rng.integers(0, 30, 3000)  # about 1200 pairs: most of them repeat
    weights = np.ones(3000, dtype=np.float32)

    def split_pairs(u, i):
        held = holdout_mask(u)
        keys = u.astype(np.int64) * 30 + i
        return np.intersect1d(keys[held], keys[~held])

    assert len(split_pairs(users, items)) > 0  # what the merge prevents
    mu, mi, mw = merge_repeats(users, items, weights, 30)
    assert len(split_pairs(mu, mi)) == 0
    keys = users.astype(np.int64) * 30 + items
    assert len(mu) == len(np.unique(keys))
    assert mw.sum() == 3000 and mw.dtype == np.float32
    # Each pair keeps the place of its first row, with the weights of all its rows.
    first = {}
    for row, key in enumerate(keys.tolist()):
        first.setdefault(key, row)
    assert (mu.astype(np.int64) * 30 + mi).tolist() == sorted(first, key=first.get)
    assert mw[0] == (keys == keys[0]).sum()


def test_without_repeats_the_rows_are_the_inputs_themselves():
    from training.matrix import merge_repeats

    users, items, weights = np.array([0, 0, 1]), np.array([0, 1, 0]), np.ones(3, np.float32)
    merged = merge_repeats(users, items, weights, 2)
    assert all(a is b for a, b in zip(merged, (users, items, weights), strict=True))


def test_list_metrics_by_hand():
    from training.protocol import list_metrics

    # 20 playlists; the most popular tenth is codes 3 and 0 (counts 9 and 8), of 16 users.
    popularity = np.array([8, 1, 1, 9] + [2] * 16)
    top = np.array([[3, 0, 5, -1], [3, 7, -1, -1]])
    metrics = list_metrics(top, popularity, 16, k=4)
    assert metrics.coverage == 4 / 20  # 3, 0, 5, 7
    assert metrics.top_decile_share == 3 / 5  # 3, 0, 3 of five filled slots
    bits = [-math.log2(9 / 16), -math.log2(8 / 16), -math.log2(2 / 16)]
    expected = (2 * bits[0] + bits[1] + 2 * bits[2]) / 5
    assert metrics.novelty == pytest.approx(expected)
    empty = list_metrics(np.full((2, 4), -1), popularity, 16, k=4)
    assert (empty.coverage, empty.top_decile_share, empty.novelty) == (0.0, 0.0, 0.0)
