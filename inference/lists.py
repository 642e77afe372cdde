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
