"""The inference seam: a model version scores batches of users into top-n lists, the same in
a pool process as in this one, and in the order its scores say."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from encore.bundle import Bundle, open_bundle, write_bundle
from encore.errors import BundleError
from encore.settings import Settings
from inference import ScoredBatch, load_model
from inference.ranker import FEATURES, LEGACY_FEATURES, Ranker
from scheduler.pool import score_in_pool
from tests.support import train_small_bundle
from training.pairing import Pairings


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return train_small_bundle(tmp_path_factory.mktemp("inference"))


def test_the_pool_scores_what_the_interface_scores(trained: Bundle, tmp_path: Path) -> None:
    users = len(trained.user_ids())
    settings = Settings(home=tmp_path, workers=2, batch_size=128)
    batches = [range(s, min(users, s + 128)) for s in range(0, users, 128)]
    pooled: list[ScoredBatch] = []
    score_in_pool(settings, trained, batches, 10, pooled.append, stop=threading.Event())

    here = load_model(trained, top_n=10).score(range(users))
    lists = {u: p for batch in pooled for u, p in zip(batch.user_ids, batch.payloads, strict=True)}
    assert lists == dict(zip(here.user_ids.tolist(), here.payloads, strict=True))
    cold = np.sort(np.concatenate([batch.cold_user_ids for batch in pooled]))
    assert cold.tolist() == sorted(here.cold_user_ids.tolist())
    assert sum(batch.deciles for batch in pooled).tolist() == here.deciles.tolist()
    assert all(batch.playlist_ids is None for batch in pooled)  # only bytes travel back
    assert len(lists) + len(cold) == users and len(lists) > users // 2


def test_codes_in_any_order_score_as_the_range_does(trained: Bundle) -> None:
    model = load_model(trained, top_n=10)
    whole = model.score(range(200))
    codes = np.random.default_rng(0).permutation(200)
    scattered = model.score(codes)
    assert dict(zip(scattered.user_ids.tolist(), scattered.payloads, strict=True)) == dict(
        zip(whole.user_ids.tolist(), whole.payloads, strict=True)
    )
    for ids, payload in zip(whole.playlist_ids, whole.payloads, strict=True):
        assert orjson.loads(payload) == ids[ids >= 0].tolist()


# --------------------------------------------------------------------------------------
# A hand-made case: the order is known
# --------------------------------------------------------------------------------------


def _by_support_bundle(bundles_dir: Path, *, legacy: bool = False) -> Bundle:
    """A ranker whose score is the candidate's log support, nothing else.

    Users 10, 20, 30 (codes 0, 1, 2); playlists 100..105 (codes 0..5). User 10 has four
    candidates out of support order, user 20 one, user 30 none (cold). ``legacy``: a bundle
    as written before the item-item generator (seven features, none named in its spec).
    """
    features = LEGACY_FEATURES if legacy else FEATURES
    ranker = Ranker(3, 6, dim=4, hidden=(), neighbours=10, candidates=5, features=features)
    ranker.set_tables(
        np.ones((3, 4), np.float32), np.ones((6, 4), np.float32), np.ones(3), np.ones(6)
    )
    with torch.no_grad():
        (linear,) = ranker.mlp
        linear.weight.zero_()
        linear.weight[0, FEATURES.index("log_support")] = 1.0
        linear.bias.zero_()
    pairings = Pairings(
        indptr=np.array([0, 4, 5, 5], dtype=np.int64),
        items=np.array([3, 1, 5, 0, 2], dtype=np.int32),
        support=np.array([0.5, 2.0, 0.1, 1.0, 3.0], dtype=np.float32),
        neighbours=np.array([1, 1, 1, 1, 1], dtype=np.uint16),
    )

    def contents(directory: Path) -> None:
        torch.save(ranker.state_dict(), directory / "weights.pt")
        np.save(directory / "user_ids.npy", np.array([10, 20, 30], dtype=np.int64))
        np.save(directory / "playlist_ids.npy", np.arange(100, 106, dtype=np.int64))
        np.save(directory / "popularity.npy", np.array([6, 5, 4, 3, 2, 1], dtype=np.int64))
        pairings.save(directory / "pairings")

    metadata = {
        "model": {
            "kind": "ranker",
            "n_users": 3,
            "n_items": 6,
            "dim": 4,
            "hidden": [],
            "neighbours": 10,
            "candidates": 5,
            **({} if legacy else {"features": list(FEATURES)}),
        }
    }
    return write_bundle(
        bundles_dir, version="by-support", metadata=metadata, write_contents=contents
    )


def test_the_ranker_orders_by_its_score(tmp_path: Path) -> None:
    model = load_model(_by_support_bundle(tmp_path), top_n=3)
    scored = model.score(np.array([0, 1, 2]))
    # User 10: supports 2.0 (101), 1.0 (100), 0.5 (103), 0.1 (105): the best three.
    assert scored.user_ids.tolist() == [10, 20]
    assert scored.payloads == [b"[101,100,103]", b"[102]"]
    assert scored.playlist_ids.tolist() == [[101, 100, 103], [102, -1, -1]]
    assert scored.cold_user_ids.tolist() == [30]
    # Popularity deciles of six playlists: 100 is the most popular (decile 1), 105 the least.
    assert scored.deciles.sum() == 4
    assert load_model(open_bundle(tmp_path, "by-support"), top_n=1).score(range(3)).payloads == [
        b"[101]",
        b"[102]",
    ]


def test_a_bundle_from_before_the_item_generator_still_scores(tmp_path: Path) -> None:
    """Seven features and no item scores in its pairings: loaded as it was trained."""
    model = load_model(_by_support_bundle(tmp_path, legacy=True), top_n=3)
    assert model.score(np.array([0, 1, 2])).payloads == [b"[101,100,103]", b"[102]"]


def test_an_unknown_model_kind_is_refused_by_name(tmp_path: Path) -> None:
    bundle = _by_support_bundle(tmp_path)
    odd = Bundle(bundle.path, {**bundle.metadata, "model": {"kind": "onnx"}})
    with pytest.raises(BundleError, match=r"kind 'onnx'.*kinds: program, ranker"):
        load_model(odd, top_n=3)
