"""Training the ranker on its own task, and what its validation share chooses.

The examples are the inner folds' users with a held-out playlist among their candidates. A
share of those users (never the test split) is kept aside: the ranker stops at the epoch that
ranks their held-out playlists best, and the popularity penalty is the largest one that keeps
their recall@10 within ``RECALL_TOLERANCE`` of the best penalty's, because a penalty on
popular playlists shows more of the catalog at almost no cost in accuracy.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import torch

from encore.progress import Progress
from inference.ranker import Ranker

logger = logging.getLogger("encore.fit")

VALIDATION_SHARE = 0.15  # of the example users
PENALTIES = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
RECALL_TOLERANCE = 0.01  # relative: 1 % of the best recall@10
CUTOFF = 10


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

    def split(self, share: float, seed: int) -> tuple[Examples, Examples | None]:
        """(training, validation), split by user: one user's rows of both folds stay together."""
        users = torch.unique(self.users).numpy()
        count = int(len(users) * share)
        if count == 0 or count == len(users):
            return self, None
        rng = np.random.default_rng([seed, 7])
        aside = torch.from_numpy(np.isin(self.users.numpy(), rng.choice(users, count, False)))
        return self.take(torch.nonzero(~aside).squeeze(1)), self.take(
            torch.nonzero(aside).squeeze(1)
        )


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
    epochs: int  # the epoch kept (1-based); all of them without a validation share
    popularity_penalty: float
    validation: dict  # what the validation share measured, for the bundle's metadata


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
    """Fit the ranker's MLP (listwise softmax over each user's candidates); with
    ``popularity_penalty`` None, choose it on the validation share."""
    if len(examples.raw) == 0:
        logger.warning("no user has a held-out playlist among its candidates; ranker untrained")
        return TrainingChoice(float("nan"), 0, popularity_penalty or 0.0, {})
    train, validation = examples.split(VALIDATION_SHARE, seed)
    mask = train.mask
    with torch.no_grad():
        ranker.feature_mean.copy_(train.raw[mask].mean(dim=0))
        ranker.feature_std.copy_(train.raw[mask].std(dim=0).clamp(min=1e-6))
    standardized = (train.raw - ranker.feature_mean) / ranker.feature_std
    optimizer = torch.optim.Adam(ranker.mlp.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    n = len(standardized)
    last, best_recall, best_epoch, best_state = float("nan"), -1.0, epochs, None
    by_epoch = []
    for epoch in range(epochs):
        ranker.train()
        order = torch.randperm(n, generator=generator)
        total, batches = 0.0, 0
        for start in range(0, n, batch_users):
            b = order[start : start + batch_users]
            scores = ranker.mlp(standardized[b]).squeeze(-1).masked_fill(~mask[b], -torch.inf)
            log_p = torch.log_softmax(scores, dim=1).masked_fill(~mask[b], 0.0)
            target = train.labels[b].float()
            loss = (-(log_p * target).sum(dim=1) / target.sum(dim=1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            batches += 1
        last = total / max(batches, 1)
        if validation is not None:
            recall = _recall(ranker, validation, 0.0)
            by_epoch.append(round(recall, 5))
            if recall > best_recall:
                best_recall, best_epoch = recall, epoch + 1
                best_state = copy.deepcopy(ranker.mlp.state_dict())
        report("ranker", epoch + 1, epochs, loss=last)
    ranker.eval()
    if validation is None:
        return TrainingChoice(last, epochs, popularity_penalty or 0.0, {})
    ranker.mlp.load_state_dict(best_state)
    penalties = PENALTIES if popularity_penalty is None else (popularity_penalty,)
    measured = {
        penalty: (_recall(ranker, validation, penalty), _coverage(ranker, validation, penalty))
        for penalty in penalties
    }
    best = max(recall for recall, _ in measured.values())
    chosen = max(
        p for p, (recall, _) in measured.items() if recall >= best * (1 - RECALL_TOLERANCE)
    )
    logger.debug("ranker: epoch %d kept, popularity penalty %s", best_epoch, chosen)
    return TrainingChoice(
        last,
        best_epoch,
        chosen,
        {
            "users": len(torch.unique(validation.users)),
            "recall@10_by_epoch": by_epoch,
            "by_popularity_penalty": {
                str(p): {"recall@10": round(r, 5), "coverage@10": round(c, 5)}
                for p, (r, c) in measured.items()
            },
        },
    )


def _top(ranker: Ranker, examples: Examples, penalty: float) -> torch.Tensor:
    """Positions of each row's top ``CUTOFF`` candidates, with the popularity penalty."""
    with torch.no_grad():
        standardized = (examples.raw - ranker.feature_mean) / ranker.feature_std
        scores = ranker.mlp(standardized).squeeze(-1)
        log_popularity = examples.raw[..., ranker.feature_names.index("log_popularity")]
        scores = (scores - penalty * log_popularity).masked_fill(~examples.mask, -torch.inf)
        k = min(CUTOFF, scores.shape[1])
        values, where = torch.topk(scores, k, dim=1)
        return torch.where(torch.isfinite(values), where, -1)


def _recall(ranker: Ranker, examples: Examples, penalty: float) -> float:
    top = _top(ranker, examples, penalty)
    hits = torch.gather(examples.labels, 1, top.clamp(min=0)) & (top >= 0)
    return float((hits.sum(dim=1) / examples.held.clamp(min=1, max=CUTOFF)).mean())


def _coverage(ranker: Ranker, examples: Examples, penalty: float) -> float:
    top = _top(ranker, examples, penalty)
    items = torch.gather(examples.items, 1, top.clamp(min=0))[top >= 0]
    return len(torch.unique(items)) / ranker.item_embedding.num_embeddings
