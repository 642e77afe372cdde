"""Lists as the online store keeps them (JSON bytes), and their popularity deciles."""

from __future__ import annotations

import numpy as np
import orjson


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


def popularity_deciles(popularity: np.ndarray) -> np.ndarray:
    """Decile of each playlist code by popularity: 1 holds the most popular tenth."""
    n = len(popularity)
    order = np.argsort(-np.asarray(popularity), kind="stable")
    decile = np.empty(n, dtype=np.int64)
    decile[order] = 1 + (np.arange(n) * 10) // max(n, 1)
    return decile


def popular_fill(
    seen_indptr: np.ndarray,
    seen_ranks: np.ndarray,
    n_items: int,
    taken_rows: np.ndarray,
    taken_ranks: np.ndarray,
    need: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the ``need[row]`` most popular items it has neither seen nor taken.

    The rows' seen items are CSR arrays (``seen_indptr``, ``seen_ranks``) of popularity ranks
    (0 is the most popular item); ``(taken_rows, taken_ranks)`` are ranks the rows already
    hold. Returns ``(row, rank)`` pairs ordered by row, then rank; a row gets fewer when fewer
    are free.
    """
    n_rows = len(seen_indptr) - 1
    seen_counts = np.diff(seen_indptr)
    taken_counts = np.bincount(np.asarray(taken_rows, np.int64), minlength=n_rows)
    # Among the first need + seen + taken ranks there are always ``need`` free ones.
    width = int(min(n_items, (np.asarray(need) + seen_counts + taken_counts).max(initial=0)))
    blocked = np.zeros((n_rows, width), dtype=bool)
    for owner, rank in (
        (np.repeat(np.arange(n_rows), seen_counts), np.asarray(seen_ranks, np.int64)),
        (np.asarray(taken_rows, np.int64), np.asarray(taken_ranks, np.int64)),
    ):
        hit = rank < width
        blocked[owner[hit], rank[hit]] = True
    free = ~blocked
    wanted = free & (np.cumsum(free, axis=1) <= np.asarray(need)[:, None])
    return np.nonzero(wanted)


def complete_with_popular(
    top: np.ndarray,
    seen_indptr: np.ndarray,
    seen_ranks: np.ndarray,
    head: np.ndarray,
    rank_of: np.ndarray | None = None,
) -> np.ndarray:
    """``top`` (item codes, -1 in free slots at the end of a row) with each row's free slots
    taken, in order, by the most popular items the row has neither seen nor listed.

    ``seen_indptr``/``seen_ranks`` are the rows' seen items as popularity ranks; ``head`` is
    the item codes by popularity (``head[rank]``); ``rank_of`` its inverse, when the caller
    keeps it (the nightly run calls this once per batch: rebuilding it costs O(playlists)).
    """
    top = np.array(top, dtype=np.int64, copy=True)
    free = top < 0
    if not free.any():
        return top
    if rank_of is None:
        rank_of = np.empty(len(head), dtype=np.int64)
        rank_of[head] = np.arange(len(head))
    held_row, held_col = np.nonzero(~free)
    fill_row, fill_rank = popular_fill(
        seen_indptr,
        seen_ranks,
        len(head),
        held_row,
        rank_of[top[held_row, held_col]],
        free.sum(axis=1),
    )
    # A row's free slots, in order, take its fills, in order (as many as it got).
    slot_row, slot_col = np.nonzero(free)
    position = np.arange(len(slot_row)) - np.searchsorted(slot_row, slot_row)
    keep = position < np.bincount(fill_row, minlength=len(top))[slot_row]
    top[slot_row[keep], slot_col[keep]] = head[fill_rank]
    return top
