"""The interface every model kind implements, and what scoring a batch gives back."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from encore.bundle import Bundle
from inference.candidates import CandidateArrays, CandidateReader
from inference.lists import complete_with_popular, encode_lists, popularity_deciles

# A batch of users: a contiguous range of user codes (a full run's batches), or user codes.
Users = range | np.ndarray


@dataclass(frozen=True)
class ScoredBatch:
    """One batch's lists, as ids and as the JSON bytes the online store keeps."""

    user_ids: np.ndarray  # int64 ids of the users with a list
    playlist_ids: np.ndarray | None  # (len(user_ids), top_n) int64, -1 past a list's end
    payloads: list[bytes]  # JSON bytes of each list (``[12,7,3]``), aligned with user_ids
    cold_user_ids: np.ndarray  # users without candidates (cold), listed or not
    deciles: np.ndarray  # recommended playlists per popularity decile (1 = most popular)
    seconds: float
    by_version: dict[str, int] = field(default_factory=dict)  # users scored per model version
    # Cold users among user_ids: with its users' seen playlists, a bundle lists the popular
    # ones a cold user has not seen; the others read the run's fallback.
    listed_cold: int = 0

    @property
    def unlisted_user_ids(self) -> np.ndarray:
        """Cold users without a list of their own: they read the run's fallback."""
        if self.listed_cold == 0:
            return self.cold_user_ids
        return np.setdiff1d(self.cold_user_ids, self.user_ids)

    def for_store(self) -> ScoredBatch:
        """Without the id matrix: what a scoring process sends back to the one that writes."""
        return replace(self, playlist_ids=None)

    def counts(self) -> BatchCounts:
        """What a run counts of this batch, without its lists."""
        return BatchCounts(
            lists=len(self.user_ids) - self.listed_cold,
            cold=len(self.cold_user_ids),
            listed_cold=self.listed_cold,
            deciles=self.deciles,
            seconds=self.seconds,
            by_version=dict(self.by_version),
        )


@dataclass(frozen=True)
class BatchCounts:
    """A scored batch as a run counts it: all that travels back from an engine whose workers
    write the lists to the online store themselves."""

    lists: int  # users with a personal list (from their candidates)
    cold: int  # users without candidates (with a popular list of what they have not seen, or
    # the run's fallback)
    deciles: np.ndarray
    seconds: float  # scoring, plus writing when the worker wrote
    by_version: dict[str, int] = field(default_factory=dict)
    listed_cold: int = 0  # cold users given a popular list of their own


class ModelVersion(ABC):
    """A model version loaded once per process: user codes in, top-n lists out.

    A kind implements :meth:`rank`, the top-n playlist codes of a batch of users from their
    candidates; reading the candidates, completing short lists with the most popular playlists
    the user has not seen (when the bundle keeps what users have seen, as the quality protocol
    measures it), mapping codes to ids, encoding the lists and counting their popularity
    deciles are the same for every kind.
    """

    def __init__(self, bundle: Bundle, *, top_n: int) -> None:
        self.bundle = bundle
        self.top_n = top_n
        self.user_ids = np.asarray(bundle.user_ids())
        self.playlist_ids = np.asarray(bundle.playlist_ids())
        self.candidates = CandidateReader(bundle.pairings_dir)
        popularity = bundle.popularity()
        self.decile = popularity_deciles(popularity)
        self.seen = SeenItems.load(bundle.path / SEEN_DIR, popularity)

    @property
    def version(self) -> str:
        return self.bundle.version

    @abstractmethod
    def rank(
        self, users: np.ndarray, candidates: CandidateArrays, rows: np.ndarray | None
    ) -> np.ndarray:
        """Top ``top_n`` playlist codes per user code, ``(len(users), top_n)``, -1 padded.

        ``rows`` are the users' rows in ``candidates`` when it holds a slice of the
        pairings rather than every user; None when it holds every user.
        """

    def score(self, users: Users, *, keep: np.ndarray | None = None) -> ScoredBatch:
        """The lists of a batch of users (codes in this bundle's id map).

        ``keep``, a boolean mask over the batch, scores only those users (an experiment's
        arm); the others are left out of the result, neither listed nor cold.
        """
        clock = time.perf_counter()
        if isinstance(users, range):
            if users.step != 1:
                raise ValueError(f"a range of users must be contiguous, not {users!r}")
            codes = np.arange(users.start, users.stop, dtype=np.int64)
            rows = np.arange(len(codes))
            if keep is not None:
                codes, rows = codes[keep], rows[keep]
            top = self.rank(codes, self.candidates.slice(users.start, users.stop), rows)
        else:
            codes = np.asarray(users, dtype=np.int64)
            if keep is not None:
                codes = codes[keep]
            top = self.rank(codes, self.candidates.every_user, None)
        personal = top[:, 0] >= 0
        if self.seen is not None:
            top = self.seen.complete(codes, top)
        has_list = top[:, 0] >= 0
        warm = top[has_list]
        valid = warm >= 0
        ids = np.where(valid, self.playlist_ids[np.maximum(warm, 0)], -1)
        deciles = np.bincount(self.decile[warm[valid]], minlength=11)[1:]
        return ScoredBatch(
            user_ids=self.user_ids[codes[has_list]],
            playlist_ids=ids,
            payloads=encode_lists(ids, valid),
            cold_user_ids=self.user_ids[codes[~personal]],
            deciles=deciles.astype(np.int64),
            seconds=time.perf_counter() - clock,
            by_version={self.version: len(codes)},
            listed_cold=int((has_list & ~personal).sum()),
        )


SEEN_DIR = "seen"  # in a bundle: each user's training playlists, CSR (indptr, items)


@dataclass(frozen=True)
class SeenItems:
    """Each user's training playlists, memory-mapped, as popularity ranks on demand."""

    indptr: np.ndarray
    items: np.ndarray
    head: np.ndarray  # item codes by popularity, most popular first (ties by code)
    rank_of: np.ndarray

    @classmethod
    def load(cls, directory: Path, popularity: np.ndarray) -> SeenItems | None:
        if not (directory / "indptr.npy").exists():
            return None  # a bundle written before it kept them
        head = np.argsort(-np.asarray(popularity), kind="stable")
        rank_of = np.empty(len(head), dtype=np.int64)
        rank_of[head] = np.arange(len(head))
        return cls(
            np.load(directory / "indptr.npy", mmap_mode="r"),
            np.load(directory / "items.npy", mmap_mode="r"),
            head,
            rank_of,
        )

    def complete(self, codes: np.ndarray, top: np.ndarray) -> np.ndarray:
        """``top`` with its free (-1) slots taken by popular playlists the user has not seen."""
        if not (top < 0).any():
            return top
        starts = np.asarray(self.indptr[codes], dtype=np.int64)
        lengths = np.asarray(self.indptr[codes + 1], dtype=np.int64) - starts
        indptr = np.r_[0, np.cumsum(lengths)]
        positions = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        ranks = self.rank_of[np.asarray(self.items[positions], dtype=np.int64)]
        return complete_with_popular(top, indptr, ranks, self.head, self.rank_of)
