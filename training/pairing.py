"""User pairing: K nearest neighbours by cosine, and the candidates they support.

Neighbours come from blocked sparse products (exact) or, for large data, from a faiss
inverted-file index over the users' low-rank factors (approximate). A candidate's support is
the sum of the similarities of the neighbours holding it. The result is columnar (CSR arrays),
never one Python object per pair.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from encore.progress import Progress
from training.ann import ann_neighbours, worker_threads
from training.candidate_keys import (
    KeyCode,
    block_keys,
    max_support,
    pad_with_popular,
    top_keys,
    with_item_candidates,
)
from training.items import ItemModel
from training.matrix import popularity, row_normalize

logger = logging.getLogger("encore.pairing")

# Above this many multiply-adds (sum of squared item popularities) the exact product is
# slower than building an approximate index.
EXACT_WORK_LIMIT = 4e9
BLOCK_CELLS = 1 << 25  # dense cells per block: 128 MiB of float32
PAIRING_FILES = ("indptr", "items", "support", "neighbours")
ITEM_SCORE_FILE = "item_score"  # present when an item-item model took part


@dataclass(frozen=True)
class Pairings:
    """Candidates per user code in CSR form, ordered by support (highest first)."""

    indptr: np.ndarray  # int64, n_users + 1
    items: np.ndarray  # int32 item codes
    support: np.ndarray  # float32 sum of neighbour similarities (0 for popularity fill)
    neighbours: np.ndarray  # uint16 neighbours holding the item
    source: Path | None = None  # the directory the arrays are memory-mapped from
    item_score: np.ndarray | None = None  # float32 item-item model's score, if one took part

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        names = PAIRING_FILES + ((ITEM_SCORE_FILE,) if self.item_score is not None else ())
        for name in names:
            if self.source is not None:
                # Spilled pairings: linked (same file system) or copied by the kernel, never
                # read into memory.
                _link_or_copy(self.source / f"{name}.npy", directory / f"{name}.npy")
            else:
                np.save(directory / f"{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, directory: Path, *, mmap: bool = True) -> Pairings:
        mode = "r" if mmap else None
        arrays = (np.load(directory / f"{name}.npy", mmap_mode=mode) for name in PAIRING_FILES)
        scores = directory / f"{ITEM_SCORE_FILE}.npy"
        item_score = np.load(scores, mmap_mode=mode) if scores.exists() else None
        return cls(*arrays, source=directory if mmap else None, item_score=item_score)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@dataclass(frozen=True)
class PairingParams:
    neighbours: int = 50
    candidates: int = 75
    method: str = "auto"  # auto | exact | ann
    engine: str = "local"  # local | ray: where the ann method's neighbour search runs
    ray_address: str | None = None  # ENCORE_RAY_ADDRESS; None starts a local Ray

    def resolve(self, matrix: sp.csr_matrix) -> str:
        if self.method != "auto":
            return self.method
        work = float((popularity(matrix).astype(np.float64) ** 2).sum())
        return "exact" if work <= EXACT_WORK_LIMIT else "ann"


def pair_users(
    matrix: sp.csr_matrix,
    params: PairingParams = PairingParams(),
    *,
    user_factors: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    out: Path | None = None,
    item_model: ItemModel | None = None,
    progress: Progress | None = None,
) -> Pairings:
    """Neighbours and candidates for every row of the (log-weighted) interaction matrix, or
    for the sorted user codes ``rows`` only (entry ``i`` of the result is ``rows[i]``'s).
    With ``out``, the result is written into that directory and memory-mapped. With an
    ``item_model``, its best unseen playlists join the neighbours' (see
    :func:`candidates_from_neighbours`)."""
    method = params.resolve(matrix)
    logger.debug("pairing %d users with the %s method", matrix.shape[0], method)
    if method == "exact":
        nbr_idx, nbr_sim = exact_neighbours(matrix, params.neighbours, rows=rows, progress=progress)
    elif method == "ann":
        if user_factors is None:
            raise ValueError("the ann pairing method needs user_factors")
        nbr_idx, nbr_sim = ann_neighbours(
            user_factors,
            params.neighbours,
            queries=rows,
            ray=params.engine == "ray",
            ray_address=params.ray_address,
        )
    else:
        raise ValueError(f"unknown pairing method {params.method!r}; use auto, exact or ann")
    return candidates_from_neighbours(
        matrix, nbr_idx, nbr_sim, params.candidates, rows=rows, out=out, item_model=item_model
    )


def exact_neighbours(
    matrix: sp.csr_matrix,
    k: int,
    *,
    rows: np.ndarray | None = None,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k cosine neighbours per user, or per user of ``rows`` (-1 / 0 pad); blocked sparse
    products."""
    n_users = matrix.shape[0]
    rows = np.arange(n_users) if rows is None else np.asarray(rows, dtype=np.int64)
    normalized = row_normalize(matrix)
    transposed = normalized.T.tocsr()
    k_eff = min(k, max(n_users - 1, 0))
    idx = np.full((len(rows), k), -1, dtype=np.int64)
    sim = np.zeros((len(rows), k), dtype=np.float32)
    block = max(1, BLOCK_CELLS // max(n_users, 1))
    for start in range(0, len(rows), block):
        stop = min(len(rows), start + block)
        users = rows[start:stop]
        scores = torch.from_numpy((normalized[users] @ transposed).toarray())
        scores[torch.arange(stop - start), torch.from_numpy(users)] = -1.0  # not yourself
        if k_eff:
            values, columns = torch.topk(scores, k_eff, dim=1)
            idx[start:stop, :k_eff] = columns.numpy()
            sim[start:stop, :k_eff] = values.numpy()
        if progress:
            progress("neighbours", stop, len(rows))
    keep = sim > 0
    return np.where(keep, idx, -1), np.where(keep, sim, 0.0).astype(np.float32)


def candidates_from_neighbours(
    matrix: sp.csr_matrix,
    nbr_idx: np.ndarray,
    nbr_sim: np.ndarray,
    cap: int,
    *,
    rows: np.ndarray | None = None,
    out: Path | None = None,
    item_model: ItemModel | None = None,
    block_users: int = 8192,
) -> Pairings:
    """Rank each user's unseen neighbour playlists by support; pad with popular ones.

    With an ``item_model``, its ``count`` best unseen playlists for the user that the
    neighbours' ``cap`` do not already hold follow them (support 0, in popularity order), and
    every candidate carries the model's score (``item_score``). A user with no candidate from
    either gets none at all (a cold user, served the run's popularity fallback). Others are
    padded with the most popular playlists they have not seen, up to ``cap``, so the ranker
    always has a full slate to order. Ties in support go to the more popular playlist. With
    ``out``, the pairings are written there block by block and returned memory-mapped (at 10M
    users they are 7.5 GB).
    """
    n_items = matrix.shape[1]
    every = rows is None
    rows = np.arange(matrix.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    n_users = len(rows)
    k = nbr_idx.shape[1] if nbr_idx.ndim == 2 else 0
    head = np.argsort(-popularity(matrix), kind="stable")
    rank_of = np.empty(n_items, dtype=np.int64)
    rank_of[head] = np.arange(n_items)
    # Columns renumbered by popularity rank: a product's column is then its tie-break key.
    held = sp.csr_matrix(
        (np.ones(matrix.nnz, np.int64), rank_of[matrix.indices], matrix.indptr),
        shape=matrix.shape,
    )
    code = KeyCode.plan(n_items, k, block_users, max_support(nbr_idx, nbr_sim))

    def block(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        stop = min(n_users, start + code.block)
        users = rows[start:stop]
        keys = block_keys(held, nbr_idx[start:stop], nbr_sim[start:stop], users, code)
        keys = top_keys(keys, stop - start, cap, code)
        mine = held[start:stop] if every else held[users]  # a slice is cheaper than a gather
        scored = None
        if item_model is not None:
            scored = item_model.block(matrix[start:stop] if every else matrix[users])
            keys = with_item_candidates(
                keys, rank_of[np.maximum(scored.top_items, 0)], scored.top_items >= 0, code
            )
        keys = pad_with_popular(keys, mine, cap, code)
        ranks, support, count = code.decode(keys)
        row = keys >> code.row_shift
        lengths = np.bincount(row, minlength=stop - start)
        codes = head[ranks].astype(np.int32)
        item_score = None if scored is None else scored.lookup(row, codes)
        return lengths, codes, support, count.astype(np.uint16), item_score

    starts = range(0, n_users, code.block)
    if out is not None:
        return _spill(_in_order(block, starts), out)
    # scipy's sparse product and numpy's sort release the GIL, so blocks run side by side.
    with ThreadPoolExecutor(max_workers=worker_threads()) as pool:
        parts = list(pool.map(block, starts))
    if not parts:
        empty = np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.uint16)
        scores = None if item_model is None else np.zeros(0, np.float32)
        return Pairings(np.zeros(n_users + 1, np.int64), *empty, item_score=scores)
    fields = []
    for field in range(5):  # one field at a time: the copy never doubles the whole output
        values = [part[field] for part in parts]
        fields.append(None if values[0] is None else np.concatenate(values))
        parts = [(*part[:field], None, *part[field + 1 :]) for part in parts]
    indptr = np.r_[0, np.cumsum(fields[0])].astype(np.int64)
    return Pairings(indptr, *fields[1:4], item_score=fields[4])


def _in_order(work, starts: range):
    """``work(start)`` for every start on the pairing's threads, yielded in order, with only a
    few blocks' results held at a time."""
    window = 2 * worker_threads()
    with ThreadPoolExecutor(max_workers=worker_threads()) as pool:
        pending = deque(pool.submit(work, start) for start in starts[:window])
        for start in starts[window:]:
            yield pending.popleft().result()
            pending.append(pool.submit(work, start))
        while pending:
            yield pending.popleft().result()


def _spill(parts, out: Path) -> Pairings:
    """Write the blocks' (lengths, items, support, neighbours, item score or None) as the
    pairing files in ``out``: each field is appended to a raw file, then given its .npy
    header."""
    out.mkdir(parents=True, exist_ok=True)
    dtypes = {
        "items": np.int32,
        "support": np.float32,
        "neighbours": np.uint16,
        ITEM_SCORE_FILE: np.float32,
    }
    raws = {name: out / f"{name}.raw" for name in dtypes}
    lengths = []
    scored = False
    files = {name: path.open("wb") for name, path in raws.items()}
    try:
        for part in parts:
            lengths.append(part[0])
            scored = scored or part[4] is not None
            for name, values in zip(dtypes, part[1:], strict=True):
                if values is not None:
                    files[name].write(np.ascontiguousarray(values, dtype=dtypes[name]).tobytes())
    finally:
        for handle in files.values():
            handle.close()
    counts = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    np.save(out / "indptr.npy", np.r_[0, np.cumsum(counts)].astype(np.int64))
    total = int(counts.sum())
    for name, raw in raws.items():
        if name == ITEM_SCORE_FILE and not scored:
            raw.unlink()  # no item model took part
            continue
        with (out / f"{name}.npy").open("wb") as target, raw.open("rb") as source:
            header = {"descr": np.dtype(dtypes[name]).str, "fortran_order": False}
            np.lib.format.write_array_header_1_0(target, {**header, "shape": (total,)})
            shutil.copyfileobj(source, target, 1 << 24)
        raw.unlink()
    return Pairings.load(out, mmap=True)
