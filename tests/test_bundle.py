"""The model bundle (a contract, docs/architecture.md): layout, metadata, versions, safe loading."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta

import numpy as np
import pytest
import torch

import training.train
from encore.bundle import (
    list_bundles,
    new_version,
    open_bundle,
    promote,
    promoted_bundle,
    promoted_version,
    write_bundle,
)
from encore.errors import BundleError
from inference.ranker import load_ranker, padded_candidates, rank_users
from training.fit import TrainParams
from training.ingest import read_catalog, read_interactions
from training.pairing import Pairings
from training.synthetic import SyntheticSpec, generate

PARAMS = TrainParams(neighbours=20, candidates=30, dim=16, hidden=(16,), epochs=2, seed=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One bundle trained on a small generated data set, and the in-memory model behind it."""
    root = tmp_path_factory.mktemp("bundle")
    data = generate(SyntheticSpec(users=800, playlists=200, seed=4), root / "data")
    interactions = read_interactions(data.interactions)
    fitted = []

    def spy(*args, **kwargs):
        fitted.append(fit(*args, **kwargs))
        return fitted[-1]

    fit = training.train.fit
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.train, "fit", spy)
        bundle, evaluation = training.train.train_bundle(
            interactions,
            root / "bundles",
            PARAMS,
            catalog=read_catalog(data.catalog),
            run_evaluation=False,
        )
    assert evaluation is None
    assert len(fitted) == 1
    return bundle, fitted[0], interactions


@pytest.fixture
def bundles_dir(trained, tmp_path):
    """A private copy of the trained bundles dir, for tests that change it."""
    bundle, _, _ = trained
    copy = tmp_path / "bundles"
    shutil.copytree(bundle.path.parent, copy)
    return copy


def test_layout_and_metadata(trained):
    bundle, _, interactions = trained
    for name in (
        "metadata.json",
        "weights.pt",
        "user_ids.npy",
        "playlist_ids.npy",
        "popularity.npy",
        "catalog.parquet",
    ):
        assert (bundle.path / name).is_file(), name
    metadata = json.loads((bundle.path / "metadata.json").read_text())
    assert metadata["version"] == bundle.version == bundle.path.name
    created = datetime.fromisoformat(metadata["created_at"])
    assert created.tzinfo is not None
    assert abs(datetime.now(created.tzinfo) - created) < timedelta(hours=1)
    assert metadata["data_fingerprint"] == interactions.fingerprint
    assert metadata["data_fingerprint"].startswith("sha256:")
    hyper = metadata["hyperparameters"]
    assert hyper["dim"] == 16 and hyper["epochs"] == 2 and hyper["seed"] == 3
    assert hyper["hidden"] == [16]
    assert hyper["neighbours"] == 20 and hyper["candidates"] == 30
    assert metadata["metrics"] == {}  # present, empty without --evaluate
    assert metadata["data"]["rows"] == len(interactions)


def test_id_maps_popularity_and_pairings(trained):
    bundle, fitted, interactions = trained
    np.testing.assert_array_equal(bundle.user_ids(), np.unique(interactions.user_ids))
    np.testing.assert_array_equal(bundle.playlist_ids(), np.unique(interactions.playlist_ids))
    assert bundle.user_ids().dtype == bundle.playlist_ids().dtype == np.int64
    np.testing.assert_array_equal(bundle.popularity(), fitted.popularity)
    pairs = Pairings.load(bundle.pairings_dir)
    assert pairs.n_users == len(bundle.user_ids())
    np.testing.assert_array_equal(pairs.items, fitted.pairings.items)
    np.testing.assert_array_equal(pairs.support, fitted.pairings.support)
    codes = bundle.user_codes(np.array([bundle.user_ids()[5], -3, 10**12]))
    assert codes.tolist() == [5, -1, -1]


def test_catalog_holds_the_bundle_playlists(trained):
    import pandas as pd

    bundle, _, _ = trained
    catalog = pd.read_parquet(bundle.catalog_path)
    assert set(catalog["playlist_id"]) <= set(bundle.playlist_ids().tolist())
    assert catalog["name"].map(len).min() > 0


def test_weights_are_a_plain_state_dict_of_tensors(trained):
    bundle, _, _ = trained
    state = torch.load(bundle.path / "weights.pt", weights_only=True)
    assert isinstance(state, dict) and state
    assert all(isinstance(value, torch.Tensor) for value in state.values())


def test_loaded_ranker_scores_exactly_like_the_trained_one(trained):
    bundle, fitted, _ = trained
    loaded = load_ranker(bundle)
    assert not loaded.training
    pairs = Pairings.load(bundle.pairings_dir)
    users = np.arange(pairs.n_users)
    items, support, neighbours, mask = padded_candidates(
        pairs.indptr, pairs.items, pairs.support, pairs.neighbours, users, loaded.candidates
    )
    assert mask.any()
    with torch.inference_mode():
        before = fitted.ranker(torch.from_numpy(users), items, support, neighbours, mask)
        after = loaded(torch.from_numpy(users), items, support, neighbours, mask)
    assert torch.equal(before, after)
    assert torch.isfinite(after[mask]).all()
    np.testing.assert_array_equal(
        rank_users(loaded, pairs, users, 10), rank_users(fitted.ranker, fitted.pairings, users, 10)
    )


def test_list_promote_and_open(trained, bundles_dir):
    bundle, _, _ = trained
    assert promoted_version(bundles_dir) == bundle.version  # train_bundle promotes by default
    assert promoted_bundle(bundles_dir).version == bundle.version
    later = new_version(
        bundle.metadata["data_fingerprint"], now=datetime.now().astimezone() + timedelta(days=1)
    )

    def copy_contents(directory):
        for item in bundle.path.iterdir():
            if item.name != "metadata.json":
                copy = shutil.copytree if item.is_dir() else shutil.copy2
                copy(item, directory / item.name)

    second = write_bundle(
        bundles_dir, version=later, metadata={"note": "copy"}, write_contents=copy_contents
    )
    # A half-written (staging) directory and a directory without metadata are not bundles.
    (bundles_dir / f".{later}.tmp123").mkdir()
    (bundles_dir / "stray").mkdir()
    assert [b.version for b in list_bundles(bundles_dir)] == [bundle.version, second.version]
    assert promoted_version(bundles_dir) == bundle.version  # writing does not promote

    promote(bundles_dir, second.version)
    assert promoted_version(bundles_dir) == second.version
    assert open_bundle(bundles_dir, second.version).metadata["note"] == "copy"
    promote(bundles_dir, bundle.version)  # rollback
    assert promoted_bundle(bundles_dir).version == bundle.version


def test_missing_and_incomplete_bundles_are_refused(trained, bundles_dir):
    bundle, _, _ = trained
    with pytest.raises(BundleError, match="no bundle version"):
        open_bundle(bundles_dir, "20000101T000000000000Z-deadbeef")
    with pytest.raises(BundleError):
        promote(bundles_dir, "nope")
    assert promoted_version(bundles_dir) == bundle.version  # a failed promote changes nothing
    (bundles_dir / bundle.version / "user_ids.npy").unlink()
    with pytest.raises(BundleError, match="incomplete"):
        open_bundle(bundles_dir, bundle.version)
    assert list_bundles(bundles_dir) == []
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(
            bundles_dir, version=bundle.version, metadata={}, write_contents=lambda directory: None
        )


def test_nothing_promoted_is_a_bundle_error(tmp_path):
    assert promoted_version(tmp_path) is None
    assert list_bundles(tmp_path / "absent") == []
    with pytest.raises(BundleError, match="no promoted model"):
        promoted_bundle(tmp_path)


def test_failed_write_leaves_no_trace(tmp_path):
    def broken(directory):
        (directory / "weights.pt").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_bundle(tmp_path, version="v1", metadata={}, write_contents=broken)
    assert list(tmp_path.iterdir()) == []


def test_pickled_module_in_weights_is_refused(trained, bundles_dir):
    bundle, fitted, _ = trained
    weights = bundles_dir / bundle.version / "weights.pt"
    torch.save(fitted.ranker, weights)  # a whole pickled nn.Module, not a state dict
    opened = open_bundle(bundles_dir, bundle.version)
    with pytest.raises(BundleError, match="pickled"):
        opened.load_state_dict()
    with pytest.raises(BundleError):
        load_ranker(opened)


@pytest.mark.parametrize(
    "content",
    [{"weight": torch.zeros(2), "step": 3}, [torch.zeros(2)]],
    ids=["non-tensor value", "not a dict"],
)
def test_weights_that_are_not_a_dict_of_tensors_are_refused(trained, bundles_dir, content):
    bundle, _, _ = trained
    torch.save(content, bundles_dir / bundle.version / "weights.pt")
    with pytest.raises(BundleError, match="dict of tensors"):
        open_bundle(bundles_dir, bundle.version).load_state_dict()


def test_garbage_weights_are_a_bundle_error(trained, bundles_dir):
    bundle, _, _ = trained
    (bundles_dir / bundle.version / "weights.pt").write_bytes(b"not a torch file")
    with pytest.raises(BundleError):
        open_bundle(bundles_dir, bundle.version).load_state_dict()


def test_update_metrics_keeps_the_rest(trained, bundles_dir):
    bundle, _, _ = trained
    opened = open_bundle(bundles_dir, bundle.version)
    opened.update_metrics({"recall@10": 0.25})
    reread = open_bundle(bundles_dir, bundle.version).metadata
    assert reread["metrics"] == {"recall@10": 0.25}
    assert reread["data_fingerprint"] == bundle.metadata["data_fingerprint"]
