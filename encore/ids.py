"""Id maps: the sorted unique ids of users or playlists, an id's code being its position."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IdMap:
    """Sorted unique ids; an id's code is its position."""

    ids: np.ndarray  # int64, sorted

    def __len__(self) -> int:
        return len(self.ids)

    def codes(self, ids: np.ndarray) -> np.ndarray:
        """Codes of ``ids``; -1 where an id is unknown."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self.ids) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        position = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return np.where(self.ids[position] == ids, position, -1)
