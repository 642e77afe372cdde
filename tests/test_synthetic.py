"""The synthetic data set: deterministic, and shaped like real listening data."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from training.ingest import read_catalog, read_interactions
from training.synthetic import SyntheticSpec, generate

USERS, PLAYLISTS = 3000, 600


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    calls: list[tuple[int, int]] = []
    spec = SyntheticSpec(users=USERS, playlists=PLAYLISTS, seed=0, chunk_users=700)
    data = generate(spec, out, progress=lambda stage, done, total: calls.append((done, total)))
    return data, calls


def test_same_seed_same_content_other_seed_other_content(generated, tmp_path):
    data, _ = generated
    again = generate(
        SyntheticSpec(users=USERS, playlists=PLAYLISTS, seed=0, chunk_users=700), tmp_path / "again"
    )
    other = generate(
        SyntheticSpec(users=USERS, playlists=PLAYLISTS, seed=1, chunk_users=700), tmp_path / "other"
    )
    first = pq.read_table(data.interactions)
    assert first.equals(pq.read_table(again.interactions))
    assert pq.read_table(data.catalog).equals(pq.read_table(again.catalog))
    assert again.rows == data.rows
    assert not first.equals(pq.read_table(other.interactions))
    assert not pq.read_table(data.catalog).equals(pq.read_table(other.catalog))


def test_reads_back_through_ingest(generated):
    data, _ = generated
    interactions = read_interactions(data.interactions)
    assert len(interactions) == data.rows
    assert interactions.timestamps is not None


def test_shape(generated):
    data, _ = generated
    table = pq.read_table(data.interactions).to_pandas()
    assert len(table) == data.rows
    users, playlists = table["user_id"].to_numpy(), table["playlist_id"].to_numpy()
    assert users.min() >= 0 and playlists.min() >= 0
    assert users.min() >= 1 and users.max() <= USERS
    assert playlists.min() >= 1 and playlists.max() <= PLAYLISTS
    assert len(np.unique(users)) == USERS  # every user has at least one interaction
    assert len(np.unique(playlists)) > 0.9 * PLAYLISTS
    assert not table.duplicated(["user_id", "playlist_id"]).any()
    assert (table["weight"] >= 1).all()
    assert table["timestamp"].between(1_767_225_600, 1_767_225_600 + 180 * 86_400).all()
    # File order mixes users, like an event log, instead of grouping them.
    assert (np.diff(users) != 0).mean() > 0.5


def test_light_users_and_heavy_tails(generated):
    data, _ = generated
    table = pq.read_table(data.interactions).to_pandas()
    per_user = table["user_id"].value_counts().to_numpy()
    light = (per_user <= 2).mean()
    assert 0.1 <= light <= 0.35, light  # about light_user_share (0.15), plus short Pareto draws
    assert per_user.max() >= 10 * np.median(per_user)

    per_playlist = np.sort(table["playlist_id"].value_counts().to_numpy())[::-1]
    # A popularity head much bigger than the median playlist...
    assert per_playlist[0] >= 15 * np.median(per_playlist)
    # ...the top 1% of playlists holding far more than 1% of the listens...
    assert per_playlist[: PLAYLISTS // 100].sum() >= 0.08 * len(table)
    # ...and counts falling along a power law: a straight log-log line over the top 100.
    ranks = np.arange(1, 101)
    slope, _ = np.polyfit(np.log(ranks), np.log(per_playlist[:100]), 1)
    assert -1.2 <= slope <= -0.4, slope


def test_catalog_has_a_name_per_playlist(generated):
    data, _ = generated
    catalog = read_catalog(data.catalog)
    assert sorted(catalog["playlist_id"]) == list(range(1, PLAYLISTS + 1))
    names = catalog["name"].tolist()
    assert all(isinstance(name, str) and name.strip() for name in names)
    assert len(set(names)) == PLAYLISTS  # each name ends with its #number
    # Some names exercise quoting, markup-like text and non-Latin scripts.
    assert any('"' in name for name in names)
    assert any(any(ord(ch) > 0x2FF for ch in name) for name in names)


def test_progress_reaches_the_total(generated):
    _, calls = generated
    assert calls[-1] == (USERS, USERS)
    assert [done for done, _ in calls] == [700, 1400, 2100, 2800, 3000]
    assert all(total == USERS for _, total in calls)


def test_generate_json_records_the_spec(generated):
    data, _ = generated
    recorded = json.loads((data.interactions.parent / "generate.json").read_text())
    assert recorded["users"] == USERS
    assert recorded["seed"] == 0
    assert recorded["rows"] == data.rows


def test_rejects_empty_specs(tmp_path):
    with pytest.raises(ValueError, match="at least 1 user"):
        generate(SyntheticSpec(users=0, playlists=10), tmp_path)
    with pytest.raises(ValueError, match="2 playlists"):
        generate(SyntheticSpec(users=10, playlists=1), tmp_path)
