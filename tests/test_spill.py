"""Training's large arrays on disk: the users' factors and the pairings spilled at scale give the
same model as in memory, and a memory map's rows can be given back and read again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.ann import _grouped
from training.spill import release_rows, spill


def _resident_kb(path: Path) -> int:
    """Resident kB of this process's mapping of ``path``."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.endswith(str(path)):
            for detail in lines[i + 1 :]:
                if detail.startswith("Rss:"):
                    return int(detail.split()[1])
    raise AssertionError(f"{path} is not mapped")


def test_released_rows_leave_the_resident_set_and_read_back_the_same(tmp_path):
    original = np.random.default_rng(0).standard_normal((200_000, 16)).astype(np.float32)
    mapped = spill(original, tmp_path / "factors.npy")
    assert isinstance(mapped, np.memmap)
    np.testing.assert_array_equal(mapped, original)  # every page read: resident
    assert _resident_kb(tmp_path / "factors.npy") > 10_000
    release_rows(mapped)
    assert _resident_kb(tmp_path / "factors.npy") < 100
    np.testing.assert_array_equal(mapped, original)  # read again from the page cache
    release_rows(mapped[10:20])  # a view: left alone, not misplaced
    release_rows(original)  # in memory: a no-op
    np.testing.assert_array_equal(mapped, original)


def test_grouping_a_memory_map_equals_a_gather(tmp_path):
    factors = np.random.default_rng(1).standard_normal((150_000, 8)).astype(np.float32)
    order = np.random.default_rng(2).permutation(len(factors))
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    mapped = spill(factors, tmp_path / "f.npy")
    np.testing.assert_array_equal(_grouped(np.asarray(mapped), mapped, position), factors[order])
    np.testing.assert_array_equal(_grouped(factors, factors, position), factors[order])


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    from training.ingest import read_interactions
    from training.matrix import encode
    from training.synthetic import SyntheticSpec, generate

    data = generate(SyntheticSpec(users=2500, playlists=500, seed=3), tmp_path_factory.mktemp("d"))
    interactions = read_interactions(data.interactions)
    users, user_codes = encode(interactions.user_ids)
    items, item_codes = encode(interactions.playlist_ids)
    return user_codes, item_codes, interactions.weights, (len(users), len(items))


def test_a_spilled_fit_is_the_fit_in_memory(codes, tmp_path):
    from training.fit import TrainParams, fit

    params = TrainParams(dim=16, epochs=2, neighbours=10, candidates=20, pairing_method="ann")
    here = fit(*codes, params)
    spilled = fit(*codes, params, spill=tmp_path / "spill")
    assert isinstance(spilled.pairings.items, np.memmap)
    for name in ("indptr", "items", "support", "neighbours"):
        np.testing.assert_array_equal(getattr(spilled.pairings, name), getattr(here.pairings, name))
    a, b = here.ranker.state_dict(), spilled.ranker.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), key
