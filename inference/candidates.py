"""A bundle's candidates per user (the pairings' CSR arrays), read without a Python object
per pair."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

COLUMNS = ("items", "support", "neighbours")
ITEM_SCORE = "item_score"  # a column only pairings made with an item-item model have


@dataclass(frozen=True)
class CandidateArrays:
    """The pairings' CSR arrays, or a slice of them: a user's candidates are
    ``items[indptr[row]:indptr[row + 1]]``, best support first."""

    indptr: np.ndarray
    items: np.ndarray
    support: np.ndarray
    neighbours: np.ndarray
    item_score: np.ndarray | None = None


class CandidateReader:
    """Reads the candidates of a range of users with pread, not a memory map.

    Each batch's slice is read into fresh memory and freed after the batch, so a scoring
    process's resident memory stays at one batch rather than growing to every page it ever
    touched. Scattered users (a backfill) read the memory-mapped arrays instead.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.indptr = np.load(directory / "indptr.npy")
        self.columns: dict[str, tuple[int, int, np.dtype]] = {}
        self.names = COLUMNS + ((ITEM_SCORE,) if (directory / f"{ITEM_SCORE}.npy").exists() else ())
        for name in self.names:
            path = directory / f"{name}.npy"
            header = np.load(path, mmap_mode="r")  # only to learn the data offset and dtype
            offset, dtype = header.offset, header.dtype
            del header
            self.columns[name] = (os.open(path, os.O_RDONLY), offset, dtype)
        self._every_user: CandidateArrays | None = None

    def slice(self, start: int, stop: int) -> CandidateArrays:
        """Users ``start`` to ``stop`` (codes); row 0 of the slice is user ``start``."""
        first, last = int(self.indptr[start]), int(self.indptr[stop])
        arrays = {}
        for name in self.names:
            fd, offset, dtype = self.columns[name]
            size = (last - first) * dtype.itemsize
            raw = os.pread(fd, size, offset + first * dtype.itemsize)
            arrays[name] = np.frombuffer(raw, dtype=dtype)
        return CandidateArrays(self.indptr[start : stop + 1] - first, **arrays)

    @property
    def every_user(self) -> CandidateArrays:
        """Every user's candidates, memory-mapped; a user's row is its code."""
        if self._every_user is None:
            self._every_user = CandidateArrays(
                self.indptr,
                **{
                    name: np.load(self.directory / f"{name}.npy", mmap_mode="r")
                    for name in self.names
                },
            )
        return self._every_user
