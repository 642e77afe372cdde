"""The built-in model kind, ``ranker``: embeddings next to what the neighbours already say.

A ranker that only reorders candidates by a dot product does worse than the neighbour support
itself, so the score is a small MLP over the pair's features: the candidate's support and its
share of the user's best support, how many neighbours hold it, its position in support order,
its popularity, the user's activity, the dot product of 128-dimensional user and playlist
embeddings (low-rank factors of the interaction matrix, kept frozen), the item-item
model's score and its share of the user's best (when the bundle's pairings carry it), and the
candidate's place in the user's list by the item model's score and by the dot product.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from encore.bundle import Bundle
from inference.base import ModelVersion
from inference.candidates import CandidateArrays

FEATURES = (
    "log_support",
    "relative_support",
    "neighbour_share",
    "position",
    "log_popularity",
    "log_activity",
    "embedding_dot",
    "item_score",
    "relative_item_score",
    "item_score_rank",
    "embedding_rank",
)
# The features of the item-item model and popularity alone: where the neighbours and the
# embeddings add nothing the item model does not know (MovieLens 100k), a ranker over them
# all learns their noise; training compares this set with all of them (ranker_training).
ITEM_FEATURES = ("item_score", "relative_item_score", "item_score_rank", "log_popularity")
# Bundles written before the item-item generator name no features in their model spec (and
# those written before the ranks name the nine they learnt on).
LEGACY_FEATURES = FEATURES[:7]


# Embedding tables are kept in bfloat16: the nightly run gathers a 128-wide row for every
# candidate (75 per user), and half the bytes is most of that cost; the dot product they feed
# is one standardized feature among seven, where bfloat16's precision is plenty.
TABLE_DTYPE = torch.bfloat16
TABLE_BLOCK_ROWS = 1 << 16


def _empty_table(rows: int, dim: int) -> torch.Tensor:
    # Installed later by set_tables or load_state_dict; torch.empty only reserves address
    # space, so building a 1M-user model costs no time and no resident memory.
    return torch.empty(rows, dim, dtype=TABLE_DTYPE)


def _table(factors: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(factors, torch.Tensor):
        return factors.to(TABLE_DTYPE).contiguous()
    # By blocks: the factors may be a read-only memory map (training spills them at scale),
    # and a block's float32 copy is all the conversion holds besides the table.
    table = torch.empty(factors.shape, dtype=TABLE_DTYPE)
    for start in range(0, len(factors), TABLE_BLOCK_ROWS):
        block = np.array(factors[start : start + TABLE_BLOCK_ROWS], dtype=np.float32)
        table[start : start + len(block)] = torch.from_numpy(block)
    return table


class Ranker(nn.Module):
    """Scores (user, candidate) pairs; higher is better."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        *,
        dim: int = 128,
        hidden: tuple[int, ...] = (32,),
        neighbours: int = 50,
        candidates: int = 75,
        features: tuple[str, ...] = FEATURES,
        popularity_penalty: float = 0.0,
    ) -> None:
        super().__init__()
        unknown = [name for name in features if name not in FEATURES]
        if unknown:
            raise ValueError(f"unknown ranker feature {unknown[0]!r}; known: {', '.join(FEATURES)}")
        self.neighbours = neighbours
        self.candidates = candidates
        self.hidden = tuple(hidden)
        self.feature_names = tuple(features)
        # Subtracted times log(1 + popularity) from every score: a softmax-trained score is a
        # log-probability, so this divides each candidate's odds by its popularity**penalty.
        self.popularity_penalty = popularity_penalty
        self.user_embedding = nn.Embedding(n_users, dim, _weight=_empty_table(n_users, dim))
        self.item_embedding = nn.Embedding(n_items, dim, _weight=_empty_table(n_items, dim))
        self.user_embedding.weight.requires_grad_(False)
        self.item_embedding.weight.requires_grad_(False)
        self.register_buffer("user_log_activity", torch.zeros(n_users))
        self.register_buffer("item_log_popularity", torch.zeros(n_items))
        self.register_buffer("feature_mean", torch.zeros(len(features)))
        self.register_buffer("feature_std", torch.ones(len(features)))
        layers: list[nn.Module] = []
        width = len(features)
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def narrowed(self, features: tuple[str, ...]) -> Ranker:
        """An untrained ranker like this one (tables empty) that scores with ``features``."""
        return Ranker(
            self.user_embedding.num_embeddings,
            self.item_embedding.num_embeddings,
            dim=self.user_embedding.embedding_dim,
            hidden=self.hidden,
            neighbours=self.neighbours,
            candidates=self.candidates,
            features=features,
            popularity_penalty=self.popularity_penalty,
        )

    def set_tables(
        self,
        user_factors: np.ndarray,
        item_factors: np.ndarray,
        user_activity: np.ndarray,
        item_popularity: np.ndarray,
    ) -> None:
        """Install the embedding and count tables of one data set (training or serving)."""
        with torch.no_grad():
            self.user_embedding.weight = nn.Parameter(_table(user_factors), requires_grad=False)
            self.item_embedding.weight = nn.Parameter(_table(item_factors), requires_grad=False)
            self.user_log_activity = torch.from_numpy(np.log1p(user_activity).astype(np.float32))
            self.item_log_popularity = torch.from_numpy(
                np.log1p(item_popularity).astype(np.float32)
            )

    def release_tables(self) -> None:
        """Drop the embedding tables (e.g. a training fold's) until ``set_tables`` installs the
        next ones: at 10M users a user table is 2.5 GB."""
        for embedding in (self.user_embedding, self.item_embedding):
            rows, dim = embedding.weight.shape
            embedding.weight = nn.Parameter(_empty_table(rows, dim), requires_grad=False)

    def features(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        support: torch.Tensor,
        neighbours: torch.Tensor,
        item_score: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw (unstandardized) features, shape ``(batch, candidates, len(feature_names))``.

        ``items`` may hold -1 in padded slots; callers mask those scores. Without
        ``item_score`` (pairings made with no item-item model) its features are 0.
        """
        safe_items = items.clamp(min=0)
        best = support[:, :1].clamp(min=1e-6)
        position = torch.arange(items.shape[1], dtype=torch.float32) / self.candidates
        user_vectors = self.user_embedding(users)
        item_vectors = self.item_embedding(safe_items)
        dot = torch.bmm(item_vectors, user_vectors.unsqueeze(2)).squeeze(2).float()
        if item_score is None:
            item_score = torch.zeros_like(support)
        best_item = item_score.amax(dim=1, keepdim=True).clamp(min=1e-6)
        columns = {
            "log_support": lambda: torch.log1p(support),
            "relative_support": lambda: support / best,
            "neighbour_share": lambda: neighbours.float() / self.neighbours,
            "position": lambda: position.expand_as(support),
            "log_popularity": lambda: self.item_log_popularity[safe_items],
            "log_activity": lambda: self.user_log_activity[users].unsqueeze(1).expand_as(support),
            "embedding_dot": lambda: dot,
            "item_score": lambda: item_score,
            "relative_item_score": lambda: item_score / best_item,
            "item_score_rank": lambda: _rank(item_score, items, self.candidates),
            "embedding_rank": lambda: _rank(dot, items, self.candidates),
        }
        return torch.stack([columns[name]() for name in self.feature_names], dim=-1)

    def forward(
        self,
        users: torch.Tensor,
        items: torch.Tensor,
        support: torch.Tensor,
        neighbours: torch.Tensor,
        mask: torch.Tensor,
        item_score: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raw = self.features(users, items, support, neighbours, item_score)
        scores = self.mlp((raw - self.feature_mean) / self.feature_std).squeeze(-1)
        if self.popularity_penalty:
            scores = scores - self.popularity_penalty * self.item_log_popularity[items.clamp(min=0)]
        return scores.masked_fill(~mask, -math.inf)


def _rank(values: torch.Tensor, items: torch.Tensor, width: int) -> torch.Tensor:
    """Each slot's place in its row by ``values``: how many of the row's candidates score
    higher (ties share a place; padded slots, ``items`` -1, come last), over ``width``."""
    values = values.masked_fill(items < 0, -math.inf)
    # One sort and a binary search: a second argsort to invert the order costs twice as much.
    ascending = torch.sort(values, dim=1).values
    above = values.shape[1] - torch.searchsorted(ascending, values, right=True)
    return above.float() / width


def padded_candidates(
    indptr: np.ndarray,
    items: np.ndarray,
    support: np.ndarray,
    neighbours: np.ndarray,
    users: np.ndarray,
    width: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the CSR candidates of ``users`` into ``(batch, width)`` tensors plus a mask."""
    starts = indptr[users]
    lengths = np.minimum(indptr[users + 1] - starts, width)
    offsets = np.arange(width)
    mask = offsets[None, :] < lengths[:, None]
    pos = np.where(mask, starts[:, None] + offsets[None, :], 0)
    if len(items) == 0:
        pos = np.zeros_like(pos)
        items, support, neighbours = (
            np.full(1, -1, np.int32),
            np.zeros(1, np.float32),
            np.zeros(1, np.uint16),
        )
    return (
        torch.from_numpy(np.where(mask, items[pos], -1).astype(np.int64)),
        torch.from_numpy(np.where(mask, support[pos], 0.0).astype(np.float32)),
        torch.from_numpy(np.where(mask, neighbours[pos], 0).astype(np.int32)),
        torch.from_numpy(mask),
    )


def padded_item_scores(
    indptr: np.ndarray, item_score: np.ndarray | None, users: np.ndarray, width: int
) -> torch.Tensor | None:
    """The item-item scores of ``users``' candidates as ``(batch, width)``, as
    :func:`padded_candidates` lays them out (0 in padded slots); None without scores."""
    if item_score is None:
        return None
    starts = indptr[users]
    lengths = np.minimum(indptr[users + 1] - starts, width)
    mask = np.arange(width)[None, :] < lengths[:, None]
    if len(item_score) == 0:
        return torch.zeros(mask.shape, dtype=torch.float32)
    pos = np.where(mask, starts[:, None] + np.arange(width)[None, :], 0)
    return torch.from_numpy(np.where(mask, item_score[pos], 0.0).astype(np.float32))


def rank_users(
    ranker: Ranker,
    pairs: Any,
    users: np.ndarray,
    top_n: int,
    *,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Top ``top_n`` item codes per user code (``-1`` pads lists shorter than top_n).

    ``pairs`` holds CSR candidate arrays (``indptr``, ``items``, ``support``, ``neighbours``).

    ``rows`` are the users' rows in ``pairs`` when it holds a slice rather than every user.
    """
    at = users if rows is None else rows
    items, support, neighbours, mask = padded_candidates(
        pairs.indptr, pairs.items, pairs.support, pairs.neighbours, at, ranker.candidates
    )
    item_score = padded_item_scores(
        pairs.indptr, getattr(pairs, "item_score", None), at, ranker.candidates
    )
    with torch.inference_mode():
        scores = ranker(torch.from_numpy(users), items, support, neighbours, mask, item_score)
        return top_codes(scores, items, top_n)


def top_codes(scores: torch.Tensor, items: torch.Tensor, top_n: int) -> np.ndarray:
    """The ``top_n`` best-scored item codes per row, ``-1`` where a score is not finite
    (a masked slot, or past the end of a short list)."""
    k = min(top_n, scores.shape[1])
    values, where = torch.topk(scores, k, dim=1)
    top = torch.gather(items, 1, where).masked_fill(~torch.isfinite(values), -1)
    out = np.full((scores.shape[0], top_n), -1, dtype=np.int64)
    out[:, :k] = top.numpy()
    return out


def ranker_from_spec(spec: dict, n_users: int, n_items: int) -> Ranker:
    """An untrained ranker of a bundle's model spec, with tables of ``n_users`` x ``n_items``."""
    return Ranker(
        n_users,
        n_items,
        dim=spec["dim"],
        hidden=tuple(spec["hidden"]),
        neighbours=spec["neighbours"],
        candidates=spec["candidates"],
        features=tuple(spec.get("features", LEGACY_FEATURES)),
        popularity_penalty=float(spec.get("popularity_penalty", 0.0)),
    )


def load_ranker(bundle: Bundle) -> Ranker:
    """The bundle's ranker with memory-mapped weights, ready for inference."""
    spec = bundle.metadata["model"]
    ranker = ranker_from_spec(spec, spec["n_users"], spec["n_items"])
    ranker.load_state_dict(bundle.load_state_dict(), assign=True)
    ranker.user_embedding.weight.requires_grad_(False)
    ranker.item_embedding.weight.requires_grad_(False)
    return ranker.eval()


class RankerModel(ModelVersion):
    """A bundle of the built-in ranker (its state dict), loaded for inference."""

    def __init__(self, bundle: Bundle, *, top_n: int) -> None:
        super().__init__(bundle, top_n=top_n)
        self.ranker = load_ranker(bundle)

    def rank(
        self, users: np.ndarray, candidates: CandidateArrays, rows: np.ndarray | None
    ) -> np.ndarray:
        return rank_users(self.ranker, candidates, users, self.top_n, rows=rows)
