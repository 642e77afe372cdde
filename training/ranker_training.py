"""Training the ranker on its own task, and what its cross-fitted validation chooses.

The examples are the inner folds' users with a held-out playlist among their candidates (never
the test split). Cross-fitted on two halves of those users, the ranker's features (every one,
or the item model's alone) and epochs are those that rank the other half's held-out playlists
best, and the popularity penalty is the largest
one that keeps their recall@10 within ``RECALL_TOLERANCE`` of the best penalty's, because a
penalty on popular playlists shows more of the catalog at almost no cost in accuracy.
"""

from __future__ import annotations

import copy
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from encore.progress import Progress
from inference.ranker import ITEM_FEATURES, Ranker

logger = logging.getLogger("encore.fit")

# Finer where the choice usually falls: a step of 0.05 there moves coverage@10 by ~4 %.
PENALTIES = (0.0, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5)
RECALL_TOLERANCE = 0.005  # relative: 0.5 % of the best recall@10
CUTOFF = 10
SCORE_BLOCK_ROWS = 512
# The item model's features alone are tried only with fewer example users than this: an MLP
# over every feature learns the noise of a few hundred or thousand users (MovieLens 100k's
# 933, Last.fm's 1,858), and the second cross-fit doubles the ranker's cost: at the demo's
# ~10,000 example users 28 s rather than ~15 s of its minute, at 1M users ~1 GB more and
# minutes, for a choice that many examples make for themselves.
FEW_FEATURE_USERS = 5_000
AVERAGE_EPOCHS = 7  # the horizon of the weights' running average, in epochs


@dataclass(frozen=True)
class Examples:
    """One row per example user: its candidates' raw features, mask, labels and codes."""

    users: torch.Tensor  # (N,) user codes
    raw: torch.Tensor  # (N, C, F)
    mask: torch.Tensor  # (N, C) bool
    labels: torch.Tensor  # (N, C) bool: the candidate is held out for the user
    items: torch.Tensor  # (N, C) item codes, -1 padded
    held: torch.Tensor  # (N,) the user's held-out rows, among its candidates or not

    @classmethod
    def cat(cls, parts: list[Examples]) -> Examples:
        return cls(
            *(torch.cat(fields) for fields in zip(*(_fields(p) for p in parts), strict=True))
        )

    def take(self, rows: torch.Tensor) -> Examples:
        return Examples(*(field[rows] for field in _fields(self)))

    def columns(self, features: list[int]) -> Examples:
        """The same examples with only these feature columns (by index into ``raw``)."""
        if features == list(range(self.raw.shape[-1])):
            return self
        return replace(self, raw=self.raw[..., features])

    def halves(self, seed: int) -> list[tuple[Examples, Examples]]:
        """Two (training, validation) pairs, split by user (one user's rows of both folds stay
        together), each half validating once; none with fewer than two users."""
        users = torch.unique(self.users).numpy()
        if len(users) < 2:
            return []
        rng = np.random.default_rng([seed, 7])
        first = torch.from_numpy(np.isin(self.users.numpy(), rng.permutation(users)[::2]))
        a, b = torch.nonzero(first).squeeze(1), torch.nonzero(~first).squeeze(1)
        return [(self.take(b), self.take(a)), (self.take(a), self.take(b))]


def _fields(examples: Examples) -> tuple[torch.Tensor, ...]:
    return (
        examples.users,
        examples.raw,
        examples.mask,
        examples.labels,
        examples.items,
        examples.held,
    )


@dataclass(frozen=True)
class TrainingChoice:
    loss: float
    epochs: int  # epochs trained (the cross-fit's best; all of them with one user)
    popularity_penalty: float
    validation: dict  # what the cross-fit measured, for the bundle's metadata
    ranker: Ranker  # the trained ranker: the one given, or one over fewer features


@dataclass
class _CrossFit:
    """One feature set's cross-fit: a ranker per half, measured on the other after each epoch.
    The halves train independently (each on its own copy of the MLP), so they can run at once.
    """

    ranker: Ranker  # of this feature set, standardized on its examples, untrained
    examples: Examples
    halves: list[tuple[Examples, Examples]]
    recall_by_epoch: np.ndarray  # per half, summed over its validation rows: (halves, epochs)
    states: list[list[dict]]  # per half, the MLP's weights after each epoch
    initial: dict  # the MLP's weights before any training
    rows: int  # validation rows over both halves

    @classmethod
    def start(
        cls, ranker: Ranker, names: tuple[str, ...], examples: Examples, epochs: int, seed: int
    ) -> _CrossFit:
        candidate = ranker if names == ranker.feature_names else ranker.narrowed(names)
        columns = examples.columns([ranker.feature_names.index(name) for name in names])
        _standardize(candidate, columns)
        halves = columns.halves(seed)
        initial = copy.deepcopy(candidate.mlp.state_dict())
        return cls(
            candidate,
            columns,
            halves,
            np.zeros((len(halves), epochs)),
            [[] for _ in halves],
            initial,
            sum(len(validation.users) for _, validation in halves),
        )

    def train_half(self, half: int, batch_users: int, learning_rate: float, seed: int, step):
        worker = self.ranker.narrowed(self.ranker.feature_names)
        worker.feature_mean.copy_(self.ranker.feature_mean)
        worker.feature_std.copy_(self.ranker.feature_std)
        worker.mlp.load_state_dict(self.initial)
        train, validation = self.halves[half]
        kept = self.states[half]

        def measure(epoch: int) -> None:
            self.recall_by_epoch[half, epoch] = float(_recalls(worker, validation, 0.0)[0].sum())
            kept.append(copy.deepcopy(worker.mlp.state_dict()))

        epochs = self.recall_by_epoch.shape[1]
        _fit(worker, train, epochs, batch_users, learning_rate, seed, step, measure)

    @property
    def best_epoch(self) -> int:
        return int(np.argmax(self.recall_by_epoch.sum(axis=0))) + 1

    @property
    def best_recall(self) -> float:
        return float(self.recall_by_epoch.sum(axis=0).max()) / self.rows


def train_ranker(
    ranker: Ranker,
    examples: Examples,
    *,
    epochs: int,
    batch_users: int,
    learning_rate: float,
    seed: int,
    popularity_penalty: float | None,
    report: Progress,
) -> TrainingChoice:
    """Fit the ranker's MLP (listwise softmax over each user's candidates).

    Cross-fitted choices first: the example users are split in two halves, a ranker is
    trained on each half and measured on the other after every epoch, so that every example
    user validates once. This is done for the ranker's features and, with fewer example users
    than ``FEW_FEATURE_USERS``, for the item model's alone (``ITEM_FEATURES``); the set and
    the epoch with the best recall@10 over both halves are kept, and (``popularity_penalty``
    None) the penalty is chosen on the same lists. Then a ranker of that set is trained on
    every example for that many epochs: the ranker given, or a narrower one
    (``TrainingChoice.ranker``).
    """
    if len(examples.raw) == 0:
        logger.warning("no user has a held-out playlist among its candidates; ranker untrained")
        return TrainingChoice(float("nan"), 0, popularity_penalty or 0.0, {}, ranker)
    sets = [ranker.feature_names]
    users = len(torch.unique(examples.users))
    if set(ITEM_FEATURES) < set(ranker.feature_names) and users < FEW_FEATURE_USERS:
        sets.append(ITEM_FEATURES)
    halves = 2 if users >= 2 else 0  # see Examples.halves
    steps = epochs * (halves * len(sets) + 1)
    done = [0]

    def step(loss: float) -> None:
        done[0] += 1
        report("ranker", done[0], steps, loss=loss)

    if not halves:
        _standardize(ranker, examples)
        loss = _fit(ranker, examples, epochs, batch_users, learning_rate, seed, step)
        report("ranker", steps, steps, loss=loss)
        return TrainingChoice(loss, epochs, popularity_penalty or 0.0, {}, ranker)
    lock = threading.Lock()

    def locked_step(loss: float) -> None:
        with lock:
            step(loss)

    def run(job: tuple[_CrossFit, int]) -> None:
        # Each half on one thread: this MLP's ops are too small to share two threads well,
        # and two halves at once take less time than one at a time on both threads.
        torch.set_num_threads(1)
        trial, half = job
        trial.train_half(half, batch_users, learning_rate, seed, locked_step)

    threads = torch.get_num_threads()
    trials = []
    try:
        # One set at a time, its halves at once: only one set's halves are held.
        for names in sets:
            trial = _CrossFit.start(ranker, names, examples, epochs, seed)
            with ThreadPoolExecutor(max(1, min(threads, len(trial.halves)))) as pool:
                list(pool.map(run, [(trial, half) for half in range(len(trial.halves))]))
            trial.halves = []  # copies of the examples; the chosen set's are taken again
            trials.append(trial)
    finally:
        torch.set_num_threads(threads)
    # Ties keep the first: every feature.
    best = max(trials, key=lambda trial: trial.best_recall)
    ranker, examples, best_epoch = best.ranker, best.examples, best.best_epoch
    best.halves = examples.halves(seed)
    penalties = PENALTIES if popularity_penalty is None else (popularity_penalty,)
    measured = {}
    for penalty in penalties:
        recalls, items = [], []
        for (_, validation), kept in zip(best.halves, best.states, strict=True):
            ranker.mlp.load_state_dict(kept[best_epoch - 1])
            recall, listed = _recalls(ranker, validation, penalty)
            recalls.append(recall)
            items.append(listed)
        coverage = len(torch.unique(torch.cat(items))) / ranker.item_embedding.num_embeddings
        measured[penalty] = (float(torch.cat(recalls).mean()), coverage)
    top = max(recall for recall, _ in measured.values())
    # With no hit at any penalty, every penalty ties: no signal to trade recall for reach on.
    chosen = (
        min(penalties)
        if top <= 0
        else max(p for p, (recall, _) in measured.items() if recall >= top * (1 - RECALL_TOLERANCE))
    )
    ranker.mlp.load_state_dict(best.initial)
    loss = _fit(ranker, examples, best_epoch, batch_users, learning_rate, seed, step)
    report("ranker", steps, steps, loss=loss)
    logger.debug(
        "ranker: %s, %d epochs, popularity penalty %s", ranker.feature_names, best_epoch, chosen
    )
    rows = best.rows
    return TrainingChoice(
        loss,
        best_epoch,
        chosen,
        {
            "users": len(torch.unique(examples.users)),
            "features": list(ranker.feature_names),
            "recall@10_by_feature_set": {
                ", ".join(trial.ranker.feature_names): round(trial.best_recall, 5)
                for trial in trials
            },
            "recall@10_by_epoch": [round(r / rows, 5) for r in best.recall_by_epoch.sum(axis=0)],
            "by_popularity_penalty": {
                str(p): {"recall@10": round(r, 5), "coverage@10": round(c, 5)}
                for p, (r, c) in measured.items()
            },
        },
        ranker,
    )


def _standardize(ranker: Ranker, examples: Examples) -> None:
    with torch.no_grad():
        ranker.feature_mean.copy_(examples.raw[examples.mask].mean(dim=0))
        ranker.feature_std.copy_(examples.raw[examples.mask].std(dim=0).clamp(min=1e-6))


def _fit(
    ranker: Ranker,
    examples: Examples,
    epochs: int,
    batch_users: int,
    learning_rate: float,
    seed: int,
    step,
    after_epoch=None,
) -> float:
    """``epochs`` of Adam on the listwise softmax loss; the mean loss of the last epoch. The
    ranker is left with (and ``after_epoch`` sees) the running average of the weights."""
    # Standardized a batch at a time: a standardized copy of every example is as large as the
    # examples (at 100,000 users, 0.5 GB), a batch's is 0.7 MB.
    mean, std = ranker.feature_mean, ranker.feature_std
    mask = examples.mask
    optimizer = torch.optim.Adam(ranker.mlp.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    n = len(examples.raw)
    last = float("nan")
    # The weights ranked with are an exponential average of the last AVERAGE_EPOCHS or so of
    # steps: a small MLP's last step lands somewhere on a noisy path (its recall moves by
    # ±0.003 from one start to the next), the average near the middle of it.
    batches_per_epoch = max(1, -(-n // batch_users))
    decay = 1.0 - 1.0 / (AVERAGE_EPOCHS * batches_per_epoch)
    averaged = AveragedModel(ranker.mlp, multi_avg_fn=get_ema_multi_avg_fn(decay))
    raw_state = None
    for epoch in range(epochs):
        if raw_state is not None:
            ranker.mlp.load_state_dict(raw_state)
        ranker.train()
        order = torch.randperm(n, generator=generator)
        total, batches = 0.0, 0
        for start in range(0, n, batch_users):
            b = order[start : start + batch_users]
            standardized = (examples.raw[b] - mean) / std
            scores = ranker.mlp(standardized).squeeze(-1).masked_fill(~mask[b], -torch.inf)
            log_p = torch.log_softmax(scores, dim=1).masked_fill(~mask[b], 0.0)
            target = examples.labels[b].float()
            loss = (-(log_p * target).sum(dim=1) / target.sum(dim=1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            averaged.update_parameters(ranker.mlp)
            total += loss.item()
            batches += 1
        last = total / max(batches, 1)
        raw_state = copy.deepcopy(ranker.mlp.state_dict())
        ranker.mlp.load_state_dict(averaged.module.state_dict())
        ranker.eval()
        if after_epoch is not None:
            after_epoch(epoch)
        step(last)
    return last


def _top(ranker: Ranker, examples: Examples, penalty: float) -> torch.Tensor:
    """Positions of each row's top ``CUTOFF`` candidates, with the popularity penalty."""
    with torch.no_grad():
        # By blocks of rows: the hidden layer of every row at once is tens of MB, written and
        # read back from memory; a block's stays in cache (5 x faster at one thread).
        scores = torch.cat(
            [
                ranker.mlp((block - ranker.feature_mean) / ranker.feature_std).squeeze(-1)
                for block in torch.split(examples.raw, SCORE_BLOCK_ROWS)
            ]
        )
        log_popularity = examples.raw[..., ranker.feature_names.index("log_popularity")]
        scores = (scores - penalty * log_popularity).masked_fill(~examples.mask, -torch.inf)
        k = min(CUTOFF, scores.shape[1])
        values, where = torch.topk(scores, k, dim=1)
        return torch.where(torch.isfinite(values), where, -1)


def _recalls(
    ranker: Ranker, examples: Examples, penalty: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, recall@10 of its list at ``penalty``; and the playlists listed."""
    top = _top(ranker, examples, penalty)
    hits = torch.gather(examples.labels, 1, top.clamp(min=0)) & (top >= 0)
    recall = hits.sum(dim=1) / examples.held.clamp(min=1, max=CUTOFF)
    return recall, torch.gather(examples.items, 1, top.clamp(min=0))[top >= 0]
