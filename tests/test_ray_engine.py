"""The Ray engine (``ENCORE_ENGINE=ray``): the same lists as the local engine, with and without
a challenger, on the embedded SQLite and on Redis and Postgres; one actor completes; the actors
read the bundle by its path; a backfill and a stop; the pairing's neighbour search on Ray finds
the local neighbours. Needs ``uv sync --extra ray``: without Ray
these skip, under CI=true they fail."""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from encore.database import open_database
from encore.errors import EncoreError, RunStopped
from encore.experiments import Experiment, new_experiment_id
from encore.online import open_online_store
from encore.settings import Settings
from scheduler.engines import engine_for
from scheduler.job import run_backfill, run_full
from tests.conftest import IN_CI
from tests.lifecycle import USERS, _second_bundle, settings  # noqa: F401 (a fixture)
from tests.random_bundle import build_random_bundle
from tests.test_pairing_scale import clustered_vectors
from training.ann import ann_neighbours
from training.pairing import PairingParams, pair_users

USER_IDS = [7 * (code + 1) for code in range(USERS)]


@pytest.fixture(scope="module")
def ray_running() -> Iterator[None]:
    """One local Ray for the module's runs (each run would otherwise start and stop its own)."""
    if importlib.util.find_spec("ray") is None:
        message = "Ray is not installed: `uv sync --extra ray`"
        if IN_CI:
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    from encore.ray_cluster import import_ray, join_ray

    started = join_ray(Settings().ray_address)
    yield
    if started:
        import_ray().shutdown()


def _bundles(config: Settings) -> None:
    options = {"users": USERS, "playlists": 120, "candidates": 20, "dim": 16, "cold_every": 10}
    build_random_bundle(config.bundles_dir, version="random-v1", seed=0, names=True, **options)


def _engine(config: Settings, name: str, **extra) -> Settings:
    return config.model_copy(update={"engine": name, "workers": 2, **extra})


def _lists(config: Settings, run_id: str) -> dict[int, bytes | None]:
    with open_online_store(config) as store:
        return dict(zip(USER_IDS, store.read(run_id, USER_IDS), strict=True))


def _same_run(config: Settings, local_id: str, ray_id: str) -> None:
    local, ray = _lists(config, local_id), _lists(config, ray_id)
    assert sum(p is not None for p in local.values()) == USERS - len(range(0, USERS, 10))
    for user in USER_IDS:
        assert ray[user] == local[user], f"user {user}"
    with open_database(config) as db:
        a, b = db.get_run(local_id), db.get_run(ray_id)
    assert (b.users_scored, b.cold_users) == (a.users_scored, a.cold_users) == (USERS, 30)
    assert b.popularity_deciles == a.popularity_deciles
    assert b.users_by_version == a.users_by_version


def test_both_engines_publish_identical_lists(settings: Settings, ray_running) -> None:  # noqa: F811
    _bundles(settings)
    local = run_full(_engine(settings, "local"))
    ray = run_full(_engine(settings, "ray"))
    assert ray.status == "published"
    assert _current_run(settings) == ray.run_id
    _same_run(settings, local.run_id, ray.run_id)


def test_both_engines_agree_with_a_challenger(settings: Settings, ray_running) -> None:  # noqa: F811
    _second_bundle(settings)  # random-v2: the same users, other weights
    _bundles(settings)  # random-v1, promoted
    with open_database(settings) as db:
        db.start_experiment(
            Experiment(
                new_experiment_id(), "random-v1", "random-v2", 0.4, started_at=datetime.now(UTC)
            )
        )
    local = run_full(_engine(settings, "local"))
    ray = run_full(_engine(settings, "ray"))
    assert set(ray.users_by_version) == {"random-v1", "random-v2"}
    assert ray.challenger_version == "random-v2"
    _same_run(settings, local.run_id, ray.run_id)


def test_one_actor_completes(tmp_path: Path, ray_running) -> None:
    from scheduler.ray_engine import actor_count

    config = _engine(Settings(home=tmp_path / "home", batch_size=32), "ray", ray_actors=1)
    _bundles(config)
    assert actor_count(config) == 1
    # More actors than Ray has CPUs would wait for ever: capped at the CPUs it reports.
    from scheduler.ray_engine import import_ray

    cpus = max(1, int(import_ray().cluster_resources().get("CPU", 0)))
    assert actor_count(config.model_copy(update={"ray_actors": 512})) == cpus
    record = run_full(config)
    assert record.status == "published" and record.users_scored == USERS
    assert _current_run(config) == record.run_id


def test_the_actors_read_the_bundle_by_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_running
) -> None:
    """A relative ENCORE_HOME, as the driver sees it: the actors get absolute paths."""
    monkeypatch.chdir(tmp_path)
    config = _engine(Settings(home=Path("relative-home"), batch_size=64), "ray")
    _bundles(config)
    record = run_full(config)
    assert record.status == "published" and record.users_scored == USERS
    local = run_full(_engine(config, "local"))
    _same_run(config, record.run_id, local.run_id)


def test_a_backfill_through_ray_rescores_only_its_users(tmp_path: Path, ray_running) -> None:
    config = _engine(Settings(home=tmp_path / "home", batch_size=16), "ray")
    _bundles(config)
    full = run_full(_engine(config, "local"))
    wanted = USER_IDS[:100]
    with open_online_store(config) as store:  # old lists to overwrite, and a cold user's
        store.write_batch(full.run_id, wanted, [b"[1]"] * len(wanted))
    record = run_backfill(config, wanted)
    assert record.status == "published" and record.users_scored == 100
    after = _lists(config, full.run_id)
    fresh = _lists(_engine(config, "local"), run_full(_engine(config, "local")).run_id)
    for user in wanted:
        assert after[user] == fresh[user], user  # cold users (code 0, 10, ...) lost "[1]"


def test_a_stop_fails_the_run_and_keeps_the_served_one(tmp_path: Path, ray_running) -> None:
    config = _engine(Settings(home=tmp_path / "home", batch_size=16), "ray")
    _bundles(config)
    served = run_full(_engine(config, "local"))
    stop = threading.Event()

    def progress(stage: str, done: int, total: int, **fields: object) -> None:
        if done:
            stop.set()

    with pytest.raises(RunStopped):
        run_full(config, progress=progress, stop=stop)
    assert _current_run(config) == served.run_id
    with open_database(config) as db:
        failed = db.list_runs(limit=1)[0]
    assert failed.status == "failed" and failed.error.startswith("stopped")


def test_an_unknown_engine_is_named() -> None:
    with pytest.raises(ValueError, match="unknown engine 'spark'"):
        Settings(engine="spark")
    with pytest.raises(EncoreError, match="unknown engine 'spark': choose one of local, ray"):
        engine_for("spark")


def _current_run(config: Settings) -> str | None:
    with open_online_store(config) as store:
        current = store.current()
    return current.run_id if current else None


# The pairing's neighbour search on Ray: blocks of users as Ray tasks against an index put in
# the object store once, giving the local search's neighbours.


def test_the_neighbours_found_on_ray_are_the_local_ones(ray_running):
    vectors = clustered_vectors(n=6000)
    local_idx, local_sim = ann_neighbours(vectors, 20)
    ray_idx, ray_sim = ann_neighbours(vectors, 20, ray=True)  # the module's Ray
    same = (ray_idx == local_idx).all(axis=1)
    assert same.mean() >= 0.99, same.mean()
    # The same code on the same index: in practice every user, and the same similarities.
    np.testing.assert_array_equal(ray_idx, local_idx)
    np.testing.assert_array_equal(ray_sim, local_sim)


def test_pair_users_on_ray_gives_the_local_pairings(ray_running):
    rng = np.random.default_rng(3)
    vectors = clustered_vectors(n=3000)
    rows = np.repeat(np.arange(3000), 8)
    cols = rng.integers(0, 400, len(rows))
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(3000, 400))
    matrix.sum_duplicates()
    here = pair_users(matrix, PairingParams(method="ann"), user_factors=vectors)
    there = pair_users(matrix, PairingParams(method="ann", engine="ray"), user_factors=vectors)
    for name in ("indptr", "items", "support", "neighbours"):
        np.testing.assert_array_equal(getattr(there, name), getattr(here, name), err_msg=name)
