"""Fitting the whole pipeline: pairing, embeddings, and the ranker trained on its own task.

The ranker learns on the ranking it will actually do. An inner split holds out a share of each
user's training interactions; pairing and embeddings are computed on the rest; the ranker
learns to put the held-out playlists first among the user's own candidates (a listwise
softmax loss). Pairing and embeddings are then recomputed on all the data for serving.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from encore.progress import Progress
from inference.ranker import FEATURES, Ranker, padded_candidates, padded_item_scores
from training.items import ItemModel, ItemParams, fit_item_model, tune_item_model
from training.matrix import activity, interaction_matrix, low_rank_factors, popularity
from training.pairing import PairingParams, Pairings, pair_users
from training.protocol import MIN_INTERACTIONS, holdout_mask
from training.ranker_training import Examples, train_ranker
from training.spill import release_rows
from training.spill import spill as spill_array

logger = logging.getLogger("encore.fit")

# A fold pairs at most this many times the users it keeps as examples: about half of them have
# a held-out playlist among their candidates, and pairing every user of a large data set (10M)
# to keep 50,000 would cost more than the rest of the training.
EXAMPLE_SAMPLE = 4
# Each inner fold holds out other rows of the same users, so more folds are more examples for
# the ranker. Where users are few that helps (Last.fm, 1,900 of them: four folds rather than two
# add ~0.0005 to recall@10 over five seeds and show more of the catalog); where they are many
# the ranker has plenty, and each fold more costs a factorization, a pairing and epochs over more
# examples (the demo's 20,000 users: the fit took 134 s with four folds, 63 s with two).
FEW_EXAMPLES = 10_000
MIN_INNER_FOLDS, MAX_INNER_FOLDS = 2, 4


@dataclass(frozen=True)
class TrainParams:
    neighbours: int = 50
    candidates: int = 75
    pairing_method: str = "auto"
    dim: int = 128
    hidden: tuple[int, ...] = (32,)
    epochs: int = 40
    batch_users: int = 128
    learning_rate: float = 3e-3
    popularity_damping: float = 0.3
    max_training_users: int = 100_000
    inner_folds: int | None = None  # None: 2, or up to 4 where users are few (inner_fold_count)
    item_method: str = "auto"  # auto | ease | knn | none: the item-item candidate generator
    item_candidates: int = 50  # candidates per user from the item-item generator
    ease_lambda: float | None = None  # None: chosen on the first inner fold
    ease_dropout: float | None = None  # EDLAE's p; None: chosen on the first inner fold
    popularity_penalty: float | None = None  # None: chosen on the inner split (cross-fitted)
    ease_max_items: int = 12_000  # playlists (held by 2+ users) above which item-KNN replaces EASE
    item_weighted_rows: bool = True  # the item model scores a user's log-weighted row
    pairing_engine: str = "local"  # local | ray: where the neighbour search runs
    ray_address: str | None = None  # where Ray is (ENCORE_RAY_ADDRESS); not a hyper-parameter
    seed: int = 0

    def as_dict(self) -> dict:
        values = asdict(self)
        values.pop("ray_address")  # where it ran, not what it is
        return {**values, "features": list(FEATURES)}

    @property
    def items(self) -> ItemParams:
        return ItemParams(
            method=self.item_method,
            count=self.item_candidates,
            ease_lambda=self.ease_lambda,
            ease_dropout=self.ease_dropout,
            ease_max_items=self.ease_max_items,
            weighted_rows=self.item_weighted_rows,
        )

    @property
    def pairing(self) -> PairingParams:
        return PairingParams(
            self.neighbours,
            self.candidates,
            self.pairing_method,
            engine=self.pairing_engine,
            ray_address=self.ray_address,
        )

    @property
    def width(self) -> int:
        """Candidates per user at most: the neighbours' cap and the item-item model's picks."""
        return self.candidates + (self.item_candidates if self.item_method != "none" else 0)


@dataclass
class FittedModel:
    ranker: Ranker
    pairings: Pairings
    matrix: sp.csr_matrix  # log-weighted user x item matrix the model was fitted on
    popularity: np.ndarray  # users per item code
    params: TrainParams
    item_model: ItemModel | None = None
    chosen: dict = field(default_factory=dict)  # hyper-parameters chosen on the inner split
    seconds: dict[str, float] = field(default_factory=dict)
    final_loss: float = float("nan")


def fit(
    user_codes: np.ndarray,
    item_codes: np.ndarray,
    weights: np.ndarray,
    shape: tuple[int, int],
    params: TrainParams = TrainParams(),
    *,
    spill: Path | None = None,
    progress: Progress | None = None,
) -> FittedModel:
    """Fit pairing, embeddings and ranker on interactions given as integer codes.

    With ``spill`` (a directory), the users' factors and the pairings are written there and
    read back memory-mapped, rather than held in memory (at 10M users: 5 GB and 7.5 GB).
    """
    report = progress or (lambda *args, **kwargs: None)
    seconds: dict[str, float] = {}
    torch.manual_seed(params.seed)
    pairing = params.pairing

    ranker = Ranker(
        shape[0],
        shape[1],
        dim=params.dim,
        hidden=params.hidden,
        neighbours=params.neighbours,
        candidates=params.width,
    )
    clock = time.perf_counter()
    examples = []
    item_params = params.items
    folds = params.inner_folds or inner_fold_count(user_codes)
    chosen: dict = {"inner_folds": folds}
    for fold in range(folds):
        report("inner pairing", fold, folds)
        # The protocol's split rule with other seeds: inner labels never reuse test rows.
        held = holdout_mask(user_codes, seed=params.seed + 1 + fold)
        inner = interaction_matrix(user_codes[~held], item_codes[~held], weights[~held], shape)
        factors = low_rank_factors(
            inner, dim=params.dim, popularity_damping=params.popularity_damping, seed=params.seed
        )
        users = _example_users(user_codes[held], params, fold, folds)
        if fold == 0:
            inner_items, tried = tune_item_model(
                inner, item_params, user_codes[held], item_codes[held], seed=params.seed
            )
            if tried:  # what the first fold chose serves the other folds and the final fit
                item_params = replace(
                    item_params,
                    ease_lambda=inner_items.ease_lambda,
                    ease_dropout=inner_items.ease_dropout,
                )
                chosen |= {
                    "ease_lambda": inner_items.ease_lambda,
                    "ease_dropout": inner_items.ease_dropout,
                    "ease_inner_recall": {
                        f"lambda {lam:g}, dropout {p:g}": round(v, 5)
                        for (lam, p), v in tried.items()
                    },
                }
        else:
            inner_items = fit_item_model(inner, item_params)
        inner_pairs = pair_users(
            inner, pairing, user_factors=factors[0], rows=users, item_model=inner_items
        )
        ranker.set_tables(*factors, activity(inner), popularity(inner))
        examples.append(
            _examples(
                ranker,
                inner_pairs,
                users,
                user_codes[held],
                item_codes[held],
                shape[1],
                params,
                limit=params.max_training_users // folds,
            )
        )
        # The next fold's arrays replace these, not add to them; the examples hold what they
        # need of the fold's tables.
        del inner, factors, inner_pairs, inner_items
        ranker.release_tables()
    report("inner pairing", folds, folds)
    seconds["inner_pairing"] = time.perf_counter() - clock

    clock = time.perf_counter()
    choice = train_ranker(
        ranker,
        Examples.cat(examples),
        epochs=params.epochs,
        batch_users=params.batch_users,
        learning_rate=params.learning_rate,
        seed=params.seed,
        popularity_penalty=params.popularity_penalty,
        report=report,
    )
    del examples
    ranker = choice.ranker
    ranker.popularity_penalty = choice.popularity_penalty
    chosen.update(
        features=list(ranker.feature_names),
        epochs=choice.epochs,
        popularity_penalty=choice.popularity_penalty,
        ranker_validation=choice.validation,
    )
    loss = choice.loss
    seconds["ranker"] = time.perf_counter() - clock

    fitted = fit_serving(
        user_codes,
        item_codes,
        weights,
        shape,
        params,
        ranker,
        item_params,
        spill=spill,
        progress=progress,
    )
    fitted.chosen, fitted.final_loss = chosen, loss
    fitted.seconds = {**seconds, **fitted.seconds}
    return fitted


def fit_serving(
    user_codes: np.ndarray,
    item_codes: np.ndarray,
    weights: np.ndarray,
    shape: tuple[int, int],
    params: TrainParams,
    ranker: Ranker,
    item_params: ItemParams,
    *,
    spill: Path | None = None,
    progress: Progress | None = None,
) -> FittedModel:
    """The serving half of a fit: the matrix, factors, item model and pairings of every
    interaction, installed under a trained ``ranker`` (whose tables must be of ``shape``).

    Training calls it once its ranker is trained; a nightly refresh calls it with the
    promoted ranker on the latest interactions."""
    report = progress or (lambda *args, **kwargs: None)
    pairing = params.pairing
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    report("pairing", 0, 1)
    matrix = interaction_matrix(user_codes, item_codes, weights, shape)
    user_factors, item_factors = low_rank_factors(
        matrix, dim=params.dim, popularity_damping=params.popularity_damping, seed=params.seed
    )
    if spill is not None:  # read by the pairing, then by the ranker's table, never both at once
        user_factors = spill_array(user_factors, spill / "user_factors.npy")
    item_clock = time.perf_counter()
    item_model = fit_item_model(matrix, item_params)
    seconds["item_model"] = time.perf_counter() - item_clock
    pairs = pair_users(
        matrix,
        pairing,
        user_factors=user_factors,
        out=spill / "pairings" if spill else None,
        item_model=item_model,
    )
    pop = popularity(matrix)
    ranker.set_tables(user_factors, item_factors, activity(matrix), pop)
    release_rows(user_factors)
    del user_factors, item_factors
    ranker.eval()
    report("pairing", 1, 1)
    seconds["pairing"] = time.perf_counter() - clock
    return FittedModel(ranker, pairs, matrix, pop, params, item_model, seconds=seconds)


def inner_fold_count(user_codes: np.ndarray) -> int:
    """Inner folds for a data set: enough that the users who hold rows out (one example each
    per fold, at most) reach ``FEW_EXAMPLES``, between ``MIN_INNER_FOLDS`` and
    ``MAX_INNER_FOLDS``."""
    eligible = int(np.count_nonzero(np.bincount(user_codes) >= MIN_INTERACTIONS))
    wanted = -(-FEW_EXAMPLES // max(eligible, 1))
    return int(min(MAX_INNER_FOLDS, max(MIN_INNER_FOLDS, wanted)))


def _example_users(
    held_users: np.ndarray, params: TrainParams, fold: int, folds: int
) -> np.ndarray:
    """The users of a fold that may become training examples: those with a held-out row, or a
    random sample of them when they are many times more than the examples a fold keeps (only
    these users need neighbours and candidates in the fold)."""
    users = np.unique(held_users)
    sample = EXAMPLE_SAMPLE * (params.max_training_users // folds)
    if len(users) <= sample:
        return users
    rng = np.random.default_rng([params.seed, fold])
    return np.sort(rng.choice(users, sample, replace=False))


def _examples(
    ranker: Ranker,
    pairs: Pairings,
    users: np.ndarray,
    held_users: np.ndarray,
    held_items: np.ndarray,
    n_items: int,
    params: TrainParams,
    *,
    limit: int,
) -> Examples:
    """The ``users`` (``pairs`` holds theirs, in order) with a held-out playlist among their
    candidates, as training examples."""
    items, support, neighbours, mask = padded_candidates(
        pairs.indptr,
        pairs.items,
        pairs.support,
        pairs.neighbours,
        np.arange(len(users)),
        params.width,
    )
    item_score = padded_item_scores(
        pairs.indptr, pairs.item_score, np.arange(len(users)), params.width
    )
    held_keys = np.unique(held_users.astype(np.int64) * n_items + held_items)
    keys = torch.from_numpy(users).unsqueeze(1) * n_items + items
    labels = torch.from_numpy(np.isin(keys.numpy(), held_keys)) & mask
    chosen = np.flatnonzero(labels.any(dim=1).numpy())
    if len(chosen) > limit:
        rng = np.random.default_rng(params.seed)
        chosen = np.sort(rng.choice(chosen, limit, replace=False))
    select = torch.from_numpy(chosen)
    with torch.no_grad():
        raw = ranker.features(
            torch.from_numpy(users)[select],
            items[select],
            support[select],
            neighbours[select],
            None if item_score is None else item_score[select],
        )
    held_count = torch.from_numpy(np.bincount(held_users, minlength=users.max(initial=0) + 1))
    picked = torch.from_numpy(users)[select]
    return Examples(picked, raw, mask[select], labels[select], items[select], held_count[picked])
