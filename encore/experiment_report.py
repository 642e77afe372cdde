"""The verdict of an experiment: like rates per version, their difference, and its p-value.

The unit is the user, as the arms are drawn by user: a version's like rate is the share of the
users shown one of its lists who liked at least one playlist. Each rate has a Wilson score
interval, the difference (challenger minus champion) Newcombe's hybrid score interval built
from them, and the p-value is the two-sided pooled two-proportion z-test, the same as a
chi-squared test of the 2x2 table without continuity correction (the tests check both against
scipy). Plain Python (``statistics.NormalDist``): the API, which serves this report, carries
neither numpy nor scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from encore.experiments import Experiment, VersionCounts

CONFIDENCE = 0.95
OFFLINE_METRICS = ("recall@10", "ndcg@10")


@dataclass(frozen=True)
class Rate:
    successes: int
    trials: int
    value: float | None
    low: float | None
    high: float | None


@dataclass(frozen=True)
class Difference:
    value: float
    low: float
    high: float
    z: float
    p_value: float


def _z(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(successes: int, trials: int, *, confidence: float = CONFIDENCE) -> Rate:
    """The share ``successes / trials`` with its Wilson score interval."""
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be between 0 and trials ({trials}), got {successes}")
    if trials == 0:
        return Rate(0, 0, None, None, None)
    z = _z(confidence)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials**2))
    return Rate(successes, trials, p, max(0.0, centre - half), min(1.0, centre + half))


def compare(
    champion: Rate, challenger: Rate, *, confidence: float = CONFIDENCE
) -> Difference | None:
    """Challenger minus champion, with Newcombe's interval and the pooled z-test's p-value."""
    if not champion.trials or not challenger.trials:
        return None
    p1, p2 = challenger.value, champion.value
    assert p1 is not None and p2 is not None
    assert challenger.low is not None and challenger.high is not None
    assert champion.low is not None and champion.high is not None
    difference = p1 - p2
    low = difference - math.sqrt((p1 - challenger.low) ** 2 + (champion.high - p2) ** 2)
    high = difference + math.sqrt((challenger.high - p1) ** 2 + (p2 - champion.low) ** 2)
    pooled = (challenger.successes + champion.successes) / (challenger.trials + champion.trials)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / challenger.trials + 1 / champion.trials))
    z = difference / spread if spread > 0 else 0.0
    p_value = 2 * (1 - NormalDist().cdf(abs(z)))
    return Difference(difference, low, high, z, p_value)


def report(
    experiment: Experiment,
    counts: list[VersionCounts],
    *,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """The experiment's report, as ``encore experiments report --json`` and the API give it."""
    by_version = {c.version: c for c in counts}
    rates = {}
    versions = []
    for role, version in (("champion", experiment.champion), ("challenger", experiment.challenger)):
        seen = by_version.get(version, VersionCounts(version, 0, 0, 0, 0))
        rate = wilson(seen.users_liked, seen.users_viewed, confidence=confidence)
        rates[role] = rate
        offline = experiment.offline.get(version, {})
        versions.append(
            {
                "model_version": version,
                "role": role,
                "users_viewed": seen.users_viewed,
                "users_liked": seen.users_liked,
                "views": seen.views,
                "likes": seen.likes,
                "like_rate": rate.value,
                "like_rate_low": rate.low,
                "like_rate_high": rate.high,
                "offline": {k: offline.get(k) for k in OFFLINE_METRICS},
            }
        )
    difference = compare(rates["champion"], rates["challenger"], confidence=confidence)
    return {
        "experiment": experiment.as_json(),
        "confidence": confidence,
        "versions": versions,
        "difference": None
        if difference is None
        else {
            "challenger_minus_champion": difference.value,
            "low": difference.low,
            "high": difference.high,
            "z": difference.z,
            "p_value": difference.p_value,
        },
        "verdict": verdict(difference),
    }


def verdict(difference: Difference | None) -> str:
    if difference is None:
        return "not enough data: a version has no user who viewed a list"
    if difference.low > 0:
        return "the challenger is better"
    if difference.high < 0:
        return "the champion is better"
    return "no significant difference yet"
