"""Champion and challenger: an experiment, and which of its arms a user is in.

A user's arm is a deterministic hash of (experiment id, user id): the same user is in the same
arm every night while the experiment lasts, and a new experiment draws the arms afresh. The
hash is splitmix64's finalizer, written twice with identical results: in plain Python for the
API (which carries no numpy) and vectorised with numpy for the nightly run.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from encore.errors import ExperimentError

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX_1 = 0xBF58476D1CE4E5B9
MIX_2 = 0x94D049BB133111EB


@dataclass(frozen=True)
class Challenger:
    """What the nightly run and the API need of the current experiment."""

    experiment_id: str
    version: str
    share: float

    def as_json(self) -> dict[str, Any]:
        return {"experiment_id": self.experiment_id, "version": self.version, "share": self.share}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Challenger:
        return cls(str(data["experiment_id"]), str(data["version"]), float(data["share"]))


@dataclass
class Experiment:
    """A champion against a challenger that gets ``share`` of the users."""

    experiment_id: str
    champion: str
    challenger: str
    share: float
    started_at: datetime | None = None
    ended_at: datetime | None = None
    end_reason: str | None = None
    # Both versions' offline protocol metrics when the experiment started (bundle metadata).
    offline: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def arm(self) -> Challenger:
        return Challenger(self.experiment_id, self.challenger, self.share)

    def as_json(self) -> dict[str, Any]:
        return {
            "experiment_id": self.experiment_id,
            "champion": self.champion,
            "challenger": self.challenger,
            "share": self.share,
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "ended_at": self.ended_at.isoformat() if self.ended_at else None,
            "end_reason": self.end_reason,
            "offline": self.offline,
        }


@dataclass(frozen=True)
class VersionCounts:
    """One version's feedback in an experiment. A user is the unit: arms are drawn by user."""

    version: str
    users_viewed: int  # users shown a list of this version at least once
    users_liked: int  # of those, users who liked at least one playlist
    views: int
    likes: int


def new_experiment_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"exp-{now:%Y%m%dT%H%M%S}Z-{secrets.token_hex(3)}"


def check_share(share: float) -> float:
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be between 0 and 1 (exclusive), got {share}")
    return share


def _seed(experiment_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(experiment_id.encode(), digest_size=8).digest(), "big")


def _threshold(share: float) -> int:
    return min(int(share * (1 << 64)), MASK)


def _mix(x: int) -> int:
    x = ((x ^ (x >> 30)) * MIX_1) & MASK
    x = ((x ^ (x >> 27)) * MIX_2) & MASK
    return x ^ (x >> 31)


class Assignment:
    """Which users of one experiment are the challenger's (plain Python, for the API)."""

    def __init__(self, challenger: Challenger) -> None:
        self.challenger = challenger
        self.seed = _seed(challenger.experiment_id)
        self.threshold = _threshold(challenger.share)

    def is_challenger(self, user_id: int) -> bool:
        return _mix((user_id * GOLDEN + self.seed) & MASK) < self.threshold

    def in_arm(self, user_ids: Iterable[int]) -> list[bool]:
        return [self.is_challenger(u) for u in user_ids]

    def version_of(self, user_id: int, champion: str) -> str:
        return self.challenger.version if self.is_challenger(user_id) else champion


def challenger_mask(challenger: Challenger, user_ids: Any) -> Any:
    """A boolean numpy array: True where a user is in the challenger's arm."""
    import numpy as np

    x = np.asarray(user_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x * np.uint64(GOLDEN) + np.uint64(_seed(challenger.experiment_id))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(MIX_1)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(MIX_2)
        x = x ^ (x >> np.uint64(31))
    return x < np.uint64(_threshold(challenger.share))


def experiment_running(current: Experiment | None) -> ExperimentError:
    what = (
        f"experiment {current.experiment_id} ({current.challenger} against {current.champion})"
        if current
        else "another experiment"
    )
    return ExperimentError(f"{what} is running: end it first with `encore models challenge --stop`")
