"""The quality protocol end to end (docs/architecture.md): pairing, ranking, popularity."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from encore.progress import Progress
from inference.lists import complete_with_popular
from inference.ranker import padded_candidates, rank_users, top_codes
from training.fit import FittedModel, TrainParams, fit
from training.ingest import Interactions
from training.matrix import encode, merge_repeats
from training.protocol import (
    CUTOFF,
    ListMetrics,
    RankingMetrics,
    holdout_mask,
    list_metrics,
    ranking_metrics,
)


@dataclass(frozen=True)
class Evaluation:
    model: RankingMetrics
    popularity: RankingMetrics
    train_seconds: float
    rows: int
    held_out: int
    model_lists: ListMetrics | None = None
    popularity_lists: ListMetrics | None = None
    candidate_recall: dict[str, float] | None = None  # per generator, and merged
    chosen: dict | None = None  # hyper-parameters chosen on the inner split
    sweep: list[dict] | None = None  # the test lists at each popularity penalty (reported only)
    # Each candidate generator's own top 10 (padded as the run pads): what the ranker adds.
    generators: dict[str, tuple[RankingMetrics, ListMetrics]] | None = None

    def as_dict(self) -> dict:
        lists = {}
        for prefix, metrics in (("", self.model_lists), ("popularity_", self.popularity_lists)):
            if metrics is not None:
                lists[f"{prefix}coverage@10"] = round(metrics.coverage, 5)
                lists[f"{prefix}top_decile_share@10"] = round(metrics.top_decile_share, 5)
                lists[f"{prefix}novelty@10"] = round(metrics.novelty, 3)
        return {
            "protocol": "holdout 0.2, RandomState(0), users >= 5, full ranking",
            "recall@10": round(self.model.recall_at_10, 5),
            "ndcg@10": round(self.model.ndcg_at_10, 5),
            "popularity_recall@10": round(self.popularity.recall_at_10, 5),
            "popularity_ndcg@10": round(self.popularity.ndcg_at_10, 5),
            **lists,
            **{
                f"candidate_recall_{name}": round(value, 5)
                for name, value in (self.candidate_recall or {}).items()
            },
            **{f"chosen_{k}": v for k, v in (self.chosen or {}).items()},
            **{
                f"{name}_{key}": value
                for name, (accuracy, reach) in (self.generators or {}).items()
                for key, value in (
                    ("recall@10", round(accuracy.recall_at_10, 5)),
                    ("ndcg@10", round(accuracy.ndcg_at_10, 5)),
                    ("coverage@10", round(reach.coverage, 5)),
                    ("top_decile_share@10", round(reach.top_decile_share, 5)),
                    ("novelty@10", round(reach.novelty, 3)),
                )
            },
            **({"sweep": self.sweep} if self.sweep is not None else {}),
            "users_evaluated": self.model.users,
            "rows": self.rows,
            "held_out": self.held_out,
            "train_seconds": round(self.train_seconds, 2),
        }


@dataclass(frozen=True)
class Split:
    """The protocol's split of a data set, and the pipeline fitted on its training rows."""

    fitted: FittedModel
    user_ids: np.ndarray  # by user code
    playlist_ids: np.ndarray  # by item code
    held_indptr: np.ndarray  # user code -> its held-out rows in held_items
    held_items: np.ndarray
    seconds: float


@dataclass(frozen=True)
class ProtocolRows:
    """The protocol's split of a data set, before anything is fitted: the training rows as codes,
    and the held-out playlists by user code."""

    user_ids: np.ndarray  # by user code
    playlist_ids: np.ndarray  # by item code
    shape: tuple[int, int]
    user_codes: np.ndarray  # the training rows
    item_codes: np.ndarray
    weights: np.ndarray
    held_indptr: np.ndarray  # user code -> its held-out rows in held_items
    held_items: np.ndarray


def protocol_rows(interactions: Interactions) -> ProtocolRows:
    """Encode, sum repeated pairs and hold out per the protocol."""
    users, user_codes = encode(interactions.user_ids)
    items, item_codes = encode(interactions.playlist_ids)
    shape = (len(users), len(items))
    user_codes, item_codes, weights = merge_repeats(
        user_codes, item_codes, interactions.weights, shape[1]
    )
    held = holdout_mask(user_codes)
    order = np.argsort(user_codes[held], kind="stable")
    held_indptr = np.searchsorted(user_codes[held][order], np.arange(shape[0] + 1))
    return ProtocolRows(
        users.ids,
        items.ids,
        shape,
        user_codes[~held],
        item_codes[~held],
        weights[~held],
        held_indptr,
        item_codes[held][order],
    )


# Fits a pipeline on (user codes, item codes, weights, shape): training's ``fit`` by default;
# the retraining gate passes one that installs the champion's trained ranker instead.
Fitter = Callable[[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]], FittedModel]


def fit_split(
    interactions: Interactions,
    params: TrainParams,
    *,
    progress: Progress | None = None,
    fitter: Fitter | None = None,
) -> Split:
    """Hold out per the protocol and fit on the rest."""
    rows = protocol_rows(interactions)
    training = (rows.user_codes, rows.item_codes, rows.weights, rows.shape)
    clock = time.perf_counter()
    fitted = fit(*training, params, progress=progress) if fitter is None else fitter(*training)
    seconds = time.perf_counter() - clock
    return Split(
        fitted, rows.user_ids, rows.playlist_ids, rows.held_indptr, rows.held_items, seconds
    )


def evaluate(
    interactions: Interactions,
    params: TrainParams = TrainParams(),
    *,
    progress: Progress | None = None,
    batch_users: int = 4096,
    sweep: tuple[float, ...] | None = None,
    fitter: Fitter | None = None,
) -> Evaluation:
    """Hold out per the protocol, fit on the rest, and score both rankers. With ``sweep``
    (popularity penalties), also measure the lists each penalty would give: a trade-off to
    look at, never used to choose (the penalty is chosen on the inner split)."""
    split = fit_split(interactions, params, progress=progress, fitter=fitter)
    fitted, held_indptr, held_items = split.fitted, split.held_indptr, split.held_items
    shape = fitted.matrix.shape
    model_top = recommend_all(fitted, batch_users=batch_users)
    popular_top = popular_unseen(fitted.matrix, fitted.popularity, CUTOFF)
    # The lists' reach is measured over the users the accuracy is: those with held-out rows.
    tested = np.flatnonzero(np.diff(held_indptr) > 0)
    return Evaluation(
        model=ranking_metrics(model_top, held_indptr, held_items),
        popularity=ranking_metrics(popular_top, held_indptr, held_items),
        train_seconds=split.seconds,
        rows=len(interactions),
        held_out=len(held_items),
        model_lists=list_metrics(model_top[tested], fitted.popularity, shape[0]),
        popularity_lists=list_metrics(popular_top[tested], fitted.popularity, shape[0]),
        candidate_recall=candidate_recall(fitted, held_indptr, held_items),
        chosen=fitted.chosen,
        generators={
            name: (
                ranking_metrics(top, held_indptr, held_items),
                list_metrics(top[tested], fitted.popularity, shape[0]),
            )
            for name, top in generator_lists(fitted, tested, batch_users=batch_users).items()
        },
        sweep=None
        if sweep is None
        else penalty_sweep(fitted, sweep, held_indptr, held_items, batch_users=batch_users),
    )


def penalty_sweep(
    fitted: FittedModel,
    penalties: tuple[float, ...],
    held_indptr: np.ndarray,
    held_items: np.ndarray,
    *,
    batch_users: int = 4096,
) -> list[dict]:
    """Accuracy and reach of the lists at each popularity penalty."""
    tested = np.flatnonzero(np.diff(held_indptr) > 0)
    chosen = fitted.ranker.popularity_penalty
    rows = []
    try:
        for penalty in penalties:
            fitted.ranker.popularity_penalty = penalty
            top = recommend_all(fitted, batch_users=batch_users)
            accuracy = ranking_metrics(top, held_indptr, held_items)
            reach = list_metrics(top[tested], fitted.popularity, fitted.matrix.shape[0])
            rows.append(
                {
                    "popularity_penalty": penalty,
                    "recall@10": round(accuracy.recall_at_10, 5),
                    "ndcg@10": round(accuracy.ndcg_at_10, 5),
                    "coverage@10": round(reach.coverage, 5),
                    "top_decile_share@10": round(reach.top_decile_share, 5),
                    "novelty@10": round(reach.novelty, 3),
                    "chosen": penalty == chosen,
                }
            )
    finally:
        fitted.ranker.popularity_penalty = chosen
    return rows


def candidate_recall(
    fitted: FittedModel, held_indptr: np.ndarray, held_items: np.ndarray, *, block: int = 4096
) -> dict[str, float]:
    """Share of each tested user's held-out playlists among its candidates, averaged over
    users: from the neighbours alone (supported candidates), the item-item model alone (its
    picks), popularity alone (the most popular unseen, as many as the neighbours' cap), and
    the merged candidates the ranker orders. The ranker can only reorder what these found."""
    n_items = fitted.matrix.shape[1]
    tested = np.flatnonzero(np.diff(held_indptr) > 0)
    held_keys = np.repeat(np.arange(len(held_indptr) - 1), np.diff(held_indptr)) * n_items
    held_keys = np.sort(held_keys + held_items)
    pairs = fitted.pairings
    lengths = np.diff(pairs.indptr)
    owner = np.repeat(np.arange(pairs.n_users), lengths)
    items = np.asarray(pairs.items, dtype=np.int64)
    supported = np.asarray(pairs.support) > 0
    lists = {
        "neighbours": (owner[supported], items[supported]),
        "merged": (owner, items),
    }
    if fitted.item_model is not None:
        rows, picks = [], []
        for start in range(0, len(tested), block):
            users = tested[start : start + block]
            top = fitted.item_model.block(fitted.matrix[users]).top_items
            row, col = np.nonzero(top >= 0)
            rows.append(users[row])
            picks.append(top[row, col])
        lists["item_model"] = (np.concatenate(rows), np.concatenate(picks))
    popular = popular_unseen(
        fitted.matrix, fitted.popularity, fitted.params.candidates, users=tested
    )
    row, col = np.nonzero(popular >= 0)
    lists["popularity"] = (tested[row], popular[row, col])
    held_counts = np.diff(held_indptr)[tested]
    recall = {}
    for name, (users, found) in lists.items():
        hits = np.isin(users.astype(np.int64) * n_items + found, held_keys)
        per_user = np.bincount(users[hits], minlength=len(held_indptr) - 1)[tested]
        recall[name] = float(np.mean(per_user / held_counts))
    return recall


def generator_lists(
    fitted: FittedModel, users_of: np.ndarray, *, k: int = CUTOFF, batch_users: int = 4096
) -> dict[str, np.ndarray]:
    """Each generator's own top ``k`` for the users ``users_of`` (user codes; other rows stay
    -1), completed with popular unseen playlists as the run completes a short list: the
    neighbours' candidates by support, and the item model's picks by its score."""
    pairs, n_users = fitted.pairings, fitted.matrix.shape[0]
    out = {"neighbours": np.full((n_users, k), -1, dtype=np.int64)}
    if fitted.item_model is not None:
        out["item_model"] = np.full((n_users, k), -1, dtype=np.int64)
    width = fitted.ranker.candidates
    for start in range(0, len(users_of), batch_users):
        users = users_of[start : start + batch_users]
        items, support, _, mask = padded_candidates(
            pairs.indptr, pairs.items, pairs.support, pairs.neighbours, users, width
        )
        scores = support.masked_fill(~mask | (support <= 0), -torch.inf)
        out["neighbours"][users] = top_codes(scores, items, k)
        if fitted.item_model is not None:
            out["item_model"][users] = fitted.item_model.block(fitted.matrix[users]).top_items[
                :, :k
            ]
    for top in out.values():
        short = users_of[(top[users_of] < 0).any(axis=1)]
        if len(short):
            top[short] = popular_unseen(
                fitted.matrix, fitted.popularity, k, users=short, have=top[short]
            )
    return out


def recommend_all(fitted: FittedModel, *, k: int = CUTOFF, batch_users: int = 4096) -> np.ndarray:
    """The model's top-k for every user; short lists end with popular unseen playlists."""
    n_users = fitted.matrix.shape[0]
    top = np.full((n_users, k), -1, dtype=np.int64)
    for start in range(0, n_users, batch_users):
        users = np.arange(start, min(n_users, start + batch_users))
        top[users] = rank_users(fitted.ranker, fitted.pairings, users, k)
    short = np.flatnonzero((top < 0).any(axis=1))
    if len(short):
        top[short] = popular_unseen(
            fitted.matrix, fitted.popularity, k, users=short, have=top[short]
        )
    return top


def popular_unseen(
    matrix: sp.csr_matrix,
    pop: np.ndarray,
    k: int,
    *,
    users: np.ndarray | None = None,
    have: np.ndarray | None = None,
    block: int = 2048,
) -> np.ndarray:
    """Per user, ``have`` (its own picks, -1 padded) completed with popular unseen items."""
    users = np.arange(matrix.shape[0]) if users is None else users
    have = np.full((len(users), k), -1, dtype=np.int64) if have is None else have.copy()
    head = np.argsort(-pop, kind="stable")
    rank_of = np.empty(len(head), dtype=np.int64)
    rank_of[head] = np.arange(len(head))
    ranked = sp.csr_matrix(
        (np.ones(matrix.nnz, np.int8), rank_of[matrix.indices], matrix.indptr), shape=matrix.shape
    )
    for start in range(0, len(users), block):
        rows = ranked[users[start : start + block]]
        have[start : start + block] = complete_with_popular(
            have[start : start + block], rows.indptr, rows.indices, head
        )
    return have
