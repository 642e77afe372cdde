"""The quality protocol (docs/architecture.md): the hold-out split and the ranking metrics.

Every quality figure Encore reports goes through these two functions, so numbers compare.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HOLDOUT_SHARE = 0.2
MIN_INTERACTIONS = 5
CUTOFF = 10


def holdout_mask(user_codes: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Return a boolean mask over rows (in file order): True for held-out rows.

    Users with at least 5 rows hold out floor(0.2 n) of them: their first rows after shuffling
    all rows with ``numpy.random.RandomState(0).permutation(len(rows))``. The protocol is
    seed 0; training uses other seeds for its inner split.
    """
    n_rows = len(user_codes)
    perm = np.random.RandomState(seed).permutation(n_rows)
    shuffled = np.asarray(user_codes)[perm]
    order = np.argsort(shuffled, kind="stable")
    sorted_users = shuffled[order]
    group_start = np.r_[True, sorted_users[1:] != sorted_users[:-1]]
    start_index = np.maximum.accumulate(np.where(group_start, np.arange(n_rows), 0))
    rank_sorted = np.arange(n_rows) - start_index
    rank = np.empty(n_rows, dtype=np.int64)
    rank[order] = rank_sorted
    _, inverse, counts = np.unique(shuffled, return_inverse=True, return_counts=True)
    per_user = np.where(counts >= MIN_INTERACTIONS, np.floor(HOLDOUT_SHARE * counts), 0)
    held_shuffled = rank < per_user[inverse]
    held = np.zeros(n_rows, dtype=bool)
    held[perm] = held_shuffled
    return held


@dataclass(frozen=True)
class RankingMetrics:
    recall_at_10: float
    ndcg_at_10: float
    users: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "recall@10": round(self.recall_at_10, 5),
            "ndcg@10": round(self.ndcg_at_10, 5),
            "users": self.users,
        }


def ranking_metrics(
    top: np.ndarray, held_indptr: np.ndarray, held_items: np.ndarray, *, k: int = CUTOFF
) -> RankingMetrics:
    """Recall@k and NDCG@k (binary gains) averaged over users with held-out items.

    ``top`` is an ``(n_users, >=k)`` array of ranked item codes (-1 pads a short list);
    the held-out items of user ``u`` are ``held_items[held_indptr[u]:held_indptr[u + 1]]``.
    """
    top = np.asarray(top)[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discounts)
    recalls, ndcgs = [], []
    for user in range(len(held_indptr) - 1):
        held = held_items[held_indptr[user] : held_indptr[user + 1]]
        if len(held) == 0:
            continue
        hits = np.isin(top[user], held)
        cap = min(k, len(held))
        recalls.append(hits.sum() / cap)
        ndcgs.append(float((hits * discounts).sum()) / ideal[cap - 1])
    if not recalls:
        return RankingMetrics(0.0, 0.0, 0)
    return RankingMetrics(float(np.mean(recalls)), float(np.mean(ndcgs)), len(recalls))


@dataclass(frozen=True)
class ListMetrics:
    """What the lists show of the catalog, whatever their accuracy."""

    coverage: float  # share of the catalog in at least one list
    top_decile_share: float  # share of slots holding a playlist of the most popular tenth
    novelty: float  # mean self-information of a slot, -log2(users holding it / users), bits


def list_metrics(top: np.ndarray, popularity: np.ndarray, n_users: int, *, k: int = CUTOFF):
    """Coverage, top-decile share and novelty of the ``(users, >=k)`` lists ``top`` (-1 pads).

    ``popularity`` is the training count of each playlist (users holding it); the most popular
    tenth is the first ``ceil(n / 10)`` playlists by that count, ties by code.
    """
    slots = np.asarray(top)[:, :k]
    slots = slots[slots >= 0]
    n_items = len(popularity)
    if len(slots) == 0 or n_items == 0:
        return ListMetrics(0.0, 0.0, 0.0)
    head = np.argsort(-popularity, kind="stable")[: -(-n_items // 10)]
    in_head = np.zeros(n_items, dtype=bool)
    in_head[head] = True
    information = -np.log2(np.maximum(popularity, 1) / max(n_users, 1))
    return ListMetrics(
        coverage=len(np.unique(slots)) / n_items,
        top_decile_share=float(in_head[slots].mean()),
        novelty=float(information[slots].mean()),
    )
