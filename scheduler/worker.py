"""Scoring, as it runs inside each spawned worker process.

The pool's initializer loads the bundle once per process and sets torch's thread count. A
batch is one gather, one batched product and one ``torch.topk`` for 1000 users, and its lists
come back already encoded as the JSON bytes the API will send.

This module imports torch only inside the workers: the parent process, which only writes
results, stays small.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from encore.bundle import open_bundle

PAIRING_COLUMNS = ("items", "support", "neighbours")


@dataclass(frozen=True)
class BatchResult:
    user_ids: np.ndarray  # int64 ids of users with a list
    payloads: list[bytes]  # JSON bytes of each list, aligned with user_ids
    cold_user_ids: np.ndarray  # users without candidates: they read the run's fallback
    deciles: np.ndarray  # recommended playlists per popularity decile (1 = most popular)
    seconds: float


@dataclass(frozen=True)
class CandidateArrays:
    """The pairings' CSR arrays (or a slice of them), as training.ranker.rank_users reads them."""

    indptr: np.ndarray
    items: np.ndarray
    support: np.ndarray
    neighbours: np.ndarray


class PairingsReader:
    """Reads the candidates of a range of users with pread, not a memory map.

    Each batch's slice is read into fresh memory and freed after the batch, so a worker's
    resident memory stays at one batch rather than growing to every page it ever touched.
    """

    def __init__(self, directory: Path) -> None:
        self.indptr = np.load(directory / "indptr.npy")
        self.columns: dict[str, tuple[int, int, np.dtype]] = {}
        for name in PAIRING_COLUMNS:
            path = directory / f"{name}.npy"
            header = np.load(path, mmap_mode="r")  # only to learn the data offset and dtype
            offset, dtype = header.offset, header.dtype
            del header
            self.columns[name] = (os.open(path, os.O_RDONLY), offset, dtype)

    def slice(self, start: int, stop: int) -> CandidateArrays:
        first, last = int(self.indptr[start]), int(self.indptr[stop])
        arrays = []
        for name in PAIRING_COLUMNS:
            fd, offset, dtype = self.columns[name]
            size = (last - first) * dtype.itemsize
            raw = os.pread(fd, size, offset + first * dtype.itemsize)
            arrays.append(np.frombuffer(raw, dtype=dtype))
        return CandidateArrays(self.indptr[start : stop + 1] - first, *arrays)


class Scorer:
    """Everything one process needs to turn user codes into encoded lists."""

    def __init__(self, bundle_path: str | Path, top_n: int) -> None:
        from training.ranker import load_ranker

        path = Path(bundle_path)
        bundle = open_bundle(path.parent, path.name)
        self.ranker = load_ranker(bundle)
        self.reader = PairingsReader(bundle.pairings_dir)
        self.pairings = CandidateArrays(
            *(
                np.load(bundle.pairings_dir / f"{name}.npy", mmap_mode="r")
                for name in ("indptr", *PAIRING_COLUMNS)
            )
        )
        self.user_ids = np.asarray(bundle.user_ids())
        self.playlist_ids = np.asarray(bundle.playlist_ids())
        self.decile = popularity_deciles(bundle.popularity())
        self.top_n = top_n

    def score_range(self, start: int, stop: int) -> BatchResult:
        return self._score(np.arange(start, stop), self.reader.slice(start, stop), local=True)

    def score(self, codes: np.ndarray) -> BatchResult:
        return self._score(np.asarray(codes, dtype=np.int64), self.pairings, local=False)

    def _score(self, codes: np.ndarray, pairings: CandidateArrays, *, local: bool) -> BatchResult:
        from training.ranker import rank_users

        clock = time.perf_counter()
        rows = np.arange(len(codes)) if local else None
        top = rank_users(self.ranker, pairings, codes, self.top_n, rows=rows)
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
        body = orjson.dumps(
            np.ascontiguousarray(ids, dtype=np.int64), option=orjson.OPT_SERIALIZE_NUMPY
        )
        return [b"[" + row + b"]" for row in body[2:-2].split(b"],[")]
    return [orjson.dumps(row[ok].tolist()) for row, ok in zip(ids, valid, strict=True)]


_scorer: Scorer | None = None


def init_worker(bundle_path: str, top_n: int, torch_threads: int) -> None:
    """ProcessPoolExecutor initializer: load the model once per process."""
    # Ctrl-C reaches the whole process group, and a supervisor may signal it too: a worker
    # that died of it would break the pool. The parent stops its workers itself. First, as
    # importing torch takes seconds.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    global _scorer
    torch.set_num_threads(torch_threads)
    _scorer = Scorer(bundle_path, top_n)


def score_batch(batch: tuple[int, int] | np.ndarray) -> BatchResult:
    """Score a code range ``(start, stop)`` or an array of user codes in a worker."""
    if _scorer is None:  # pragma: no cover - the initializer always ran in a pool worker
        raise RuntimeError("score_batch called outside an initialized worker")
    if isinstance(batch, tuple):
        return _scorer.score_range(*batch)
    return _scorer.score(batch)
