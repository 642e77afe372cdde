"""Scoring, as it runs inside each spawned worker process.

The pool's initializer loads the bundle once per process (weights and pairings memory-mapped,
so workers share the pages) and sets torch's thread count. A batch is one gather, one batched
product and one ``torch.topk`` for 1000 users, and its lists come back already encoded as the
JSON bytes the API will send.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import torch

from encore.bundle import open_bundle
from training.fit import rank_users
from training.pairing import Pairings
from training.ranker import Ranker
from training.train import load_ranker


@dataclass(frozen=True)
class BatchResult:
    user_ids: np.ndarray  # int64 ids of users with a list
    payloads: list[bytes]  # JSON bytes of each list, aligned with user_ids
    cold_user_ids: np.ndarray  # users without candidates: they read the run's fallback
    deciles: np.ndarray  # recommended playlists per popularity decile (1 = most popular)
    seconds: float


class Scorer:
    """Everything one process needs to turn user codes into encoded lists."""

    def __init__(
        self,
        ranker: Ranker,
        pairings: Pairings,
        user_ids: np.ndarray,
        playlist_ids: np.ndarray,
        popularity: np.ndarray,
        top_n: int,
    ) -> None:
        self.ranker = ranker
        self.pairings = pairings
        self.user_ids = np.asarray(user_ids)
        self.playlist_ids = np.asarray(playlist_ids)
        self.decile = popularity_deciles(popularity)
        self.top_n = top_n

    @classmethod
    def from_bundle(cls, bundle_path: str | Path, top_n: int) -> Scorer:
        path = Path(bundle_path)
        bundle = open_bundle(path.parent, path.name)
        return cls(
            load_ranker(bundle),
            Pairings.load(bundle.pairings_dir, mmap=True),
            bundle.user_ids(),
            bundle.playlist_ids(),
            bundle.popularity(),
            top_n,
        )

    def score(self, codes: np.ndarray) -> BatchResult:
        clock = time.perf_counter()
        codes = np.asarray(codes, dtype=np.int64)
        top = rank_users(self.ranker, self.pairings, codes, self.top_n)
        has_list = top[:, 0] >= 0
        warm = top[has_list]
        valid = warm >= 0
        ids = np.where(valid, self.playlist_ids[np.maximum(warm, 0)], -1)
        deciles = np.bincount(self.decile[warm[valid]], minlength=11)[1:]
        return BatchResult(
            user_ids=self.user_ids[codes[has_list]],
            payloads=encode_lists(ids, valid),
            cold_user_ids=self.user_ids[codes[~has_list]],
            deciles=deciles.astype(np.int64),
            seconds=time.perf_counter() - clock,
        )


def popularity_deciles(popularity: np.ndarray) -> np.ndarray:
    """Decile of each playlist code by popularity: 1 holds the most popular tenth."""
    n = len(popularity)
    order = np.argsort(-np.asarray(popularity), kind="stable")
    decile = np.empty(n, dtype=np.int64)
    decile[order] = 1 + (np.arange(n) * 10) // max(n, 1)
    return decile


def encode_lists(ids: np.ndarray, valid: np.ndarray) -> list[bytes]:
    """JSON bytes per row (``[12,7,3]``), dropping invalid (-1) slots."""
    if len(ids) == 0:
        return []
    if valid.all():
        # One orjson call for the whole batch, then split the rows apart.
        body = orjson.dumps(np.ascontiguousarray(ids, dtype=np.int64), option=orjson.OPT_SERIALIZE_NUMPY)
        return [b"[" + row + b"]" for row in body[2:-2].split(b"],[")]
    return [orjson.dumps(row[ok].tolist()) for row, ok in zip(ids, valid, strict=True)]


_scorer: Scorer | None = None


def init_worker(bundle_path: str, top_n: int, torch_threads: int) -> None:
    """ProcessPoolExecutor initializer: load the model once per process."""
    global _scorer
    torch.set_num_threads(torch_threads)
    _scorer = Scorer.from_bundle(bundle_path, top_n)


def score_batch(batch: tuple[int, int] | np.ndarray) -> BatchResult:
    """Score a code range ``(start, stop)`` or an array of user codes in a worker."""
    if _scorer is None:  # pragma: no cover - the initializer always ran in a pool worker
        raise RuntimeError("score_batch called outside an initialized worker")
    codes = np.arange(*batch) if isinstance(batch, tuple) else batch
    return _scorer.score(codes)
