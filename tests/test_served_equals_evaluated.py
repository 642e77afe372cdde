"""What `encore evaluate` measures is what the nightly run publishes: the same lists, user by
user, with the same padding (popular playlists the user has not seen) for short lists and for
cold users."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from encore.bundle import promote, write_bundle
from encore.settings import get_settings
from model_server.app import create_app
from scheduler.job import run_full
from training.evaluate import fit_split, recommend_all
from training.fit import TrainParams
from training.ingest import read_interactions
from training.protocol import CUTOFF
from training.synthetic import SyntheticSpec, generate
from training.train import bundle_contents, model_spec


@pytest.mark.parametrize("item_method", ["auto", "none"])
def test_the_run_publishes_the_lists_the_evaluation_scores(tmp_path, item_method):
    data = generate(SyntheticSpec(users=900, playlists=250, seed=6), tmp_path / "data")
    rows = pd.read_parquet(data.interactions)
    # Six users holding exactly the three most popular playlists: each one's nearest
    # neighbours are the five others, who hold nothing new, so without the item-item
    # generator they are cold, and their popular fill must skip what they hold.
    top3 = rows["playlist_id"].value_counts().index[:3].to_numpy()
    clones = pd.DataFrame(
        {
            "user_id": np.repeat(np.arange(10**6, 10**6 + 6), 3),
            "playlist_id": np.tile(top3, 6),
            "weight": np.ones(18, dtype=rows["weight"].dtype),
        }
    )
    path = tmp_path / "with-clones.parquet"
    pd.concat([rows[["user_id", "playlist_id", "weight"]], clones]).to_parquet(path)
    # Few candidates, so that some lists are short and padded.
    params = TrainParams(
        dim=16, epochs=2, neighbours=5, candidates=8, item_candidates=4, item_method=item_method
    )
    split = fit_split(read_interactions(path), params)
    fitted = split.fitted
    evaluated = recommend_all(fitted)

    settings = get_settings()
    bundle = write_bundle(
        settings.bundles_dir,
        version="split",
        metadata={"model": model_spec(fitted), "data": {}, "metrics": {}},
        write_contents=bundle_contents(fitted, split.user_ids, split.playlist_ids),
    )
    promote(settings.bundles_dir, bundle.version)
    record = run_full(settings)
    assert record.users_scored == len(split.user_ids)

    user_ids = split.user_ids.tolist()
    with TestClient(create_app()) as api:
        served = []
        for start in range(0, len(user_ids), 100):
            body = api.post(
                "/v1/recommendations", json={"user_ids": user_ids[start : start + 100], "n": 10}
            ).json()
            assert all(item["source"] != "fallback" for item in body["recommendations"])
            served += [item["playlist_ids"] for item in body["recommendations"]]

    expected = [split.playlist_ids[row[row >= 0]].tolist() for row in evaluated[:, :CUTOFF]]
    assert served == expected
    # The padding took part: lists short of candidates, and (without the item model) cold
    # users, whose lists hold none of the popular playlists they have seen.
    lengths = np.diff(fitted.pairings.indptr)
    assert ((lengths > 0) & (lengths < CUTOFF)).sum() > 0, "no short list in the data"
    assert record.cold_users == int((lengths == 0).sum())
    if item_method == "none":
        cold = np.flatnonzero(lengths == 0)
        assert set(split.user_ids[cold]) >= set(range(10**6, 10**6 + 6))
        for code in np.flatnonzero(split.user_ids >= 10**6):
            assert len(served[code]) == CUTOFF
            assert not set(served[code]) & set(top3.tolist())
