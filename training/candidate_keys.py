"""Candidate lists as sortable int64 keys: one key per (user, playlist) packs the row, the
support, the popularity rank and the neighbour count, so that one ``np.sort`` orders every
user's candidates (``training/pairing.py`` builds them block by block)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from training.matrix import popular_fill


@dataclass(frozen=True)
class KeyCode:
    """Packing of (row, support, popularity rank, count) into one sortable int64.

    Sorting the keys orders rows, then support (highest first), then popularity: a plain
    ``np.sort`` of int64 is an order of magnitude faster than any argsort.
    """

    block: int
    count_bits: int
    rank_bits: int
    support_bits: int
    unit: float  # support quantum per 1.0 of similarity

    @classmethod
    def plan(cls, n_items: int, k: int, block: int, max_support: float) -> KeyCode:
        count_bits = max(1, (k + 1).bit_length())
        rank_bits = max(1, (n_items - 1).bit_length())
        block = max(1, block)
        while True:
            row_bits = max(1, (block - 1).bit_length())
            support_bits = 62 - row_bits - rank_bits - count_bits
            if support_bits >= 24 or block == 1:
                break
            block //= 2
        if support_bits < 8:
            raise ValueError(f"{n_items} items and {k} neighbours do not fit a 64-bit key")
        # Headroom for rounding each neighbour's share up, and for the padding code.
        room = (1 << support_bits) - 2 - k
        return cls(block, count_bits, rank_bits, support_bits, room / max(max_support, 1e-12))

    @property
    def count_unit(self) -> int:
        return 1 << self.support_bits

    @property
    def padding(self) -> int:
        return (1 << self.support_bits) - 1  # sorts after every supported candidate

    @property
    def row_shift(self) -> int:
        return self.support_bits + self.rank_bits + self.count_bits

    def encode(self, row: np.ndarray, support: np.ndarray, rank: np.ndarray, count: np.ndarray):
        return (
            (row << self.row_shift)
            | ((self.padding - 1 - support) << (self.rank_bits + self.count_bits))
            | (rank << self.count_bits)
            | count
        )

    def decode(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Popularity ranks, support (float32, 0 for padding) and counts of ``keys``."""
        count = keys & ((1 << self.count_bits) - 1)
        rank = (keys >> self.count_bits) & ((1 << self.rank_bits) - 1)
        inverted = (keys >> (self.rank_bits + self.count_bits)) & self.padding
        support = np.where(inverted == self.padding, 0, self.padding - 1 - inverted)
        return rank, (support / self.unit).astype(np.float32), count


def max_support(nbr_idx: np.ndarray, nbr_sim: np.ndarray, rows: int = 1 << 16) -> float:
    best = 0.0
    for start in range(0, len(nbr_idx), rows):
        ok = nbr_idx[start : start + rows] >= 0
        sims = np.where(ok, np.maximum(nbr_sim[start : start + rows], 0), 0)
        best = max(best, float(sims.sum(axis=1, dtype=np.float64).max(initial=0.0)))
    return best


def block_keys(
    held: sp.csr_matrix, idx: np.ndarray, sim: np.ndarray, users: np.ndarray, code: KeyCode
) -> np.ndarray:
    """Unsorted keys of every unseen playlist held by a neighbour, for one block of users.

    One integer product gives support and neighbour count together (count in the high bits,
    quantized support in the low ones), and a large negative weight on the user's own row
    marks every playlist it has already seen.
    """
    n = len(idx)
    ok = idx >= 0
    quantized = np.rint(np.maximum(sim, 0).astype(np.float64) * code.unit).astype(np.int64)
    # Each row: its neighbours, then the user itself; built as CSR directly (no COO sort).
    cols = np.concatenate([idx.astype(np.int64), users[:, None]], axis=1)
    data = np.concatenate(
        [quantized + code.count_unit, np.full((n, 1), -(1 << 61), np.int64)], axis=1
    )
    mask = np.concatenate([ok, np.ones((n, 1), bool)], axis=1)
    indptr = np.r_[0, np.cumsum(mask.sum(axis=1))]
    mix = sp.csr_matrix((data[mask], cols[mask], indptr), shape=(n, held.shape[0]))
    totals = mix @ held
    data = totals.data
    keep = data > 0
    row = np.repeat(np.arange(n, dtype=np.int64), np.diff(totals.indptr))[keep]
    data = data[keep]
    return code.encode(
        row,
        data & (code.count_unit - 1),
        totals.indices[keep].astype(np.int64),
        data >> code.support_bits,
    )


def top_keys(keys: np.ndarray, n_rows: int, cap: int, code: KeyCode) -> np.ndarray:
    """The ``cap`` best keys of every row, in order."""
    keys.sort()
    row = keys >> code.row_shift
    first = np.searchsorted(row, np.arange(n_rows))
    return keys[np.arange(len(keys)) - first[row] < cap]


def with_item_candidates(
    keys: np.ndarray, ranks: np.ndarray, valid: np.ndarray, code: KeyCode
) -> np.ndarray:
    """Sorted ``keys`` joined by each row's item-model picks (popularity ranks, ``(rows,
    count)``) that the row does not already hold, as unsupported candidates."""
    row, col = np.nonzero(valid)
    rank = ranks[row, col].astype(np.int64)
    rank_mask = (1 << code.rank_bits) - 1
    have = ((keys >> code.row_shift) << code.rank_bits) | ((keys >> code.count_bits) & rank_mask)
    new = ~np.isin((row.astype(np.int64) << code.rank_bits) | rank, have)
    extra = code.encode(row[new].astype(np.int64), np.int64(0), rank[new], np.int64(0))
    merged = np.concatenate([keys, extra])
    merged.sort()
    return merged


def pad_with_popular(keys: np.ndarray, held: sp.csr_matrix, cap: int, code: KeyCode) -> np.ndarray:
    """Add popular unseen playlists to rows holding between 1 and cap - 1 candidates."""
    n_rows = held.shape[0]
    row = keys >> code.row_shift
    have = np.bincount(row, minlength=n_rows)
    short = np.flatnonzero((have > 0) & (have < cap))
    if len(short) == 0:
        return keys
    # Popularity ranks are the columns of ``held``, so the fill is the first free ranks.
    slot = np.full(n_rows, -1, dtype=np.int64)
    slot[short] = np.arange(len(short))
    mine = slot[row] >= 0
    rank_mask = (1 << code.rank_bits) - 1
    fill_slot, fill_rank = popular_fill(
        held[short], slot[row[mine]], (keys[mine] >> code.count_bits) & rank_mask, cap - have[short]
    )
    fill = code.encode(short[fill_slot], np.int64(-1), fill_rank.astype(np.int64), np.int64(0))
    merged = np.concatenate([keys, fill])
    merged.sort()
    return merged
