"""Drift between two runs: their popularity-decile distributions and their cold shares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPSILON = 1e-6  # keeps PSI finite when a bucket is empty on one side


@dataclass(frozen=True)
class Drift:
    score: float  # the larger PSI of the two comparisons
    decile_psi: float
    cold_psi: float
    chi2_pvalue: float | None


def psi(current: np.ndarray, previous: np.ndarray) -> float:
    """Population stability index of two count vectors over the same buckets."""
    p = np.asarray(current, dtype=np.float64)
    q = np.asarray(previous, dtype=np.float64)
    p = np.maximum(p / max(p.sum(), 1.0), EPSILON)
    q = np.maximum(q / max(q.sum(), 1.0), EPSILON)
    return float(np.sum((p - q) * np.log(p / q)))


def compare_runs(
    deciles: list[int],
    cold: int,
    total: int,
    previous_deciles: list[int],
    previous_cold: int,
    previous_total: int,
) -> Drift:
    decile_psi = psi(np.asarray(deciles), np.asarray(previous_deciles))
    cold_psi = psi(
        np.array([cold, total - cold]), np.array([previous_cold, previous_total - previous_cold])
    )
    table = np.array([deciles, previous_deciles], dtype=np.float64)
    table = table[:, table.sum(axis=0) > 0]
    pvalue = None
    if table.shape[1] >= 2 and (table.sum(axis=1) > 0).all():
        # scipy.stats takes a second to import: only the run's end needs it, not every
        # spawned worker that re-imports the parent's main module.
        from scipy.stats import chi2_contingency

        pvalue = float(chi2_contingency(table).pvalue)
    return Drift(max(decile_psi, cold_psi), decile_psi, cold_psi, pvalue)
