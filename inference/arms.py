"""Champion and challenger side by side: each user of a batch scored by the version of its arm.

An engine loads :class:`Arms` once per process (both versions with it) and calls
:meth:`Arms.score` per batch, as it would a single :class:`~inference.ModelVersion`. Batches
are the champion's: user codes in its id map. A challenger trained on other data has its own
id map; a user of the challenger's arm it does not know is cold (the run's fallback).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from encore.bundle import Bundle
from encore.experiments import Challenger, challenger_mask
from encore.ids import IdMap
from inference.base import ModelVersion, ScoredBatch, Users
from inference.loading import load_model


class Arms:
    """The champion, and the challenger with its share of users when an experiment runs."""

    def __init__(
        self,
        champion: ModelVersion,
        challenger: ModelVersion | None = None,
        arm: Challenger | None = None,
    ) -> None:
        if (challenger is None) != (arm is None):
            raise ValueError("a challenger model needs its experiment arm, and the reverse")
        self.champion, self.challenger, self.arm = champion, challenger, arm
        self.same_users = challenger is not None and np.array_equal(
            champion.user_ids, challenger.user_ids
        )
        self.challenger_ids = IdMap(challenger.user_ids) if challenger is not None else None

    @property
    def version(self) -> str:
        return self.champion.version

    def score(self, users: Users) -> ScoredBatch:
        """The lists of a batch of the champion's user codes, each by its arm's version."""
        if self.challenger is None or self.arm is None:
            return self.champion.score(users)
        codes = (
            np.arange(users.start, users.stop, dtype=np.int64)
            if isinstance(users, range)
            else np.asarray(users, dtype=np.int64)
        )
        ids = self.champion.user_ids[codes]
        theirs = challenger_mask(self.arm, ids)
        parts = [self.champion.score(users, keep=~theirs)]
        if self.same_users:
            parts.append(self.challenger.score(users, keep=theirs))
        else:
            assert self.challenger_ids is not None
            their_codes = self.challenger_ids.codes(ids[theirs])
            known = their_codes >= 0
            scored = self.challenger.score(their_codes[known])
            unknown = ids[theirs][~known]
            parts.append(_with_cold(scored, unknown, self.challenger.version))
        return _merge(parts)


def load_arms(
    bundle: Bundle | Path,
    *,
    top_n: int,
    challenger: Bundle | Path | None = None,
    arm: Challenger | None = None,
) -> Arms:
    """The champion's model version, and the challenger's when an experiment runs."""
    champion = load_model(bundle, top_n=top_n)
    if challenger is None:
        return Arms(champion)
    return Arms(champion, load_model(challenger, top_n=top_n), arm)


def _with_cold(batch: ScoredBatch, cold_ids: np.ndarray, version: str) -> ScoredBatch:
    if not len(cold_ids):
        return batch
    return ScoredBatch(
        user_ids=batch.user_ids,
        playlist_ids=batch.playlist_ids,
        payloads=batch.payloads,
        cold_user_ids=np.concatenate([batch.cold_user_ids, cold_ids]),
        deciles=batch.deciles,
        seconds=batch.seconds,
        by_version={version: batch.by_version.get(version, 0) + len(cold_ids)},
        listed_cold=batch.listed_cold,
    )


def _merge(parts: list[ScoredBatch]) -> ScoredBatch:
    by_version: dict[str, int] = {}
    for part in parts:
        for version, count in part.by_version.items():
            by_version[version] = by_version.get(version, 0) + count
    matrices = [p.playlist_ids for p in parts]
    return ScoredBatch(
        user_ids=np.concatenate([p.user_ids for p in parts]),
        playlist_ids=None if any(m is None for m in matrices) else np.concatenate(matrices),
        payloads=[payload for p in parts for payload in p.payloads],
        cold_user_ids=np.concatenate([p.cold_user_ids for p in parts]),
        deciles=sum((p.deciles for p in parts), np.zeros(10, dtype=np.int64)),
        seconds=sum(p.seconds for p in parts),
        by_version=by_version,
        listed_cold=sum(p.listed_cold for p in parts),
    )
