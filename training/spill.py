"""Large training arrays kept on disk and read through a memory map.

At 10M users the users' factors alone are 5 GB. Written once and mapped read-only, they cost
page cache rather than process memory, and a reader that has gone through a stretch of rows
gives those pages back (``madvise(MADV_DONTNEED)``): they stay in the page cache, out of the
process's resident set.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np


def spill(array: np.ndarray, path: Path) -> np.ndarray:
    """``array`` written to ``path`` (.npy) and mapped back read-only; the caller drops its
    own reference to the original for the memory to go."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return np.load(path, mmap_mode="r")


def release_rows(array: np.ndarray, start: int = 0, stop: int | None = None) -> None:
    """Give back the resident pages of rows ``start:stop`` of a memory-mapped array (a no-op
    for an array in memory). The rows read again from the page cache when touched."""
    # Only the array np.load mapped, not a view of it: its rows start at a known place.
    mapped = array.base if isinstance(array, np.memmap) else None
    if not isinstance(mapped, mmap.mmap) or array.ndim == 0 or len(array) == 0:
        return
    stop = len(array) if stop is None else min(stop, len(array))
    row_bytes = array.strides[0]
    head = array.offset % mmap.ALLOCATIONGRANULARITY  # where the map starts in the file
    first = head + start * row_bytes
    last = head + stop * row_bytes
    # madvise wants page-aligned ranges: only whole pages inside the rows are given back.
    first = -(-first // mmap.PAGESIZE) * mmap.PAGESIZE
    last = last // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mapped.madvise(mmap.MADV_DONTNEED, first, last - first)
