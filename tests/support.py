"""Helpers shared by tests: a published run built from a random-weight bundle."""

from __future__ import annotations

from pathlib import Path

from encore.bundle import Bundle
from encore.database import RunRecord
from encore.settings import Settings
from scheduler.job import run_full
from tests.random_bundle import build_random_bundle


def publish_random_run(
    settings: Settings,
    *,
    users: int = 300,
    playlists: int = 120,
    candidates: int = 20,
    cold_every: int = 10,
    version: str = "random-v1",
    names: bool | dict[int, str] = True,
    seed: int = 0,
) -> RunRecord:
    """Build (if needed) and promote a small random bundle, then publish a full run of it.

    User ids are ``7 * (code + 1)``; every ``cold_every``-th user (code 0, k, 2k, ...) has no
    candidates and reads the fallback.
    """
    if not (settings.bundles_dir / version).exists():
        build_random_bundle(
            settings.bundles_dir,
            users=users,
            playlists=playlists,
            candidates=candidates,
            dim=16,
            cold_every=cold_every,
            version=version,
            names=names,
            seed=seed,
        )
    else:
        from encore.bundle import promote

        promote(settings.bundles_dir, version)
    return run_full(settings)


def train_small_bundle(home: Path) -> Bundle:
    """A real model trained on a generated data set (small, but every step of `encore train`)."""
    from training.fit import TrainParams
    from training.ingest import read_interactions
    from training.synthetic import SyntheticSpec, generate
    from training.train import train_bundle

    data = generate(SyntheticSpec(users=1500, playlists=300, seed=3), home / "data")
    bundle, _ = train_bundle(
        read_interactions(data.interactions),
        home / "bundles",
        TrainParams(dim=16, epochs=3),
        run_evaluation=False,
    )
    return bundle
