"""The item-item candidate generator (training/items.py) and its merge into the pairings."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from training.items import ItemParams, ease_weights, fit_item_model, knn_weights
from training.matrix import encode, interaction_matrix
from training.pairing import PairingParams, Pairings, pair_users


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    from training.ingest import read_interactions
    from training.synthetic import SyntheticSpec, generate

    data = generate(
        SyntheticSpec(users=1500, playlists=400, seed=2), tmp_path_factory.mktemp("items")
    )
    interactions = read_interactions(data.interactions)
    users, user_codes = encode(interactions.user_ids)
    items, item_codes = encode(interactions.playlist_ids)
    return interaction_matrix(
        user_codes, item_codes, interactions.weights, (len(users), len(items))
    )


def _binary(matrix: sp.csr_matrix) -> np.ndarray:
    return (matrix.toarray() > 0).astype(np.float64)


def test_ease_weights_are_the_closed_form():
    x = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 0]], float))
    lam = 0.5
    p = np.linalg.inv(x.T @ x + lam * np.eye(4))
    expected = -p / np.diag(p)[None, :]
    np.fill_diagonal(expected, 0.0)
    weights = ease_weights((x.T @ x).toarray(), lam).numpy()
    np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-5)


def test_ease_dropout_regularises_each_playlist_by_its_popularity():
    """EDLAE's closed form (Steck 2020): Λ = λI + p/(1-p) diag(XᵀX), then EASE's constraint."""
    x = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 0]], float))
    gram = (x.T @ x).toarray()
    lam, dropout = 0.5, 0.4
    p = np.linalg.inv(gram + lam * np.eye(4) + dropout / (1 - dropout) * np.diag(np.diag(gram)))
    expected = -p / np.diag(p)[None, :]
    np.fill_diagonal(expected, 0.0)
    weights = ease_weights(gram, lam, dropout).numpy()
    np.testing.assert_allclose(weights, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(weights, ease_weights(gram, lam).numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="dropout must be in"):
        ease_weights(gram, lam, 1.0)


def test_knn_weights_keep_each_playlists_k_nearest_by_cosine(matrix):
    binary = _binary(matrix)
    norms = np.linalg.norm(binary, axis=0)
    cosine = (binary.T @ binary) / np.maximum(np.outer(norms, norms), 1e-12)
    np.fill_diagonal(cosine, 0.0)
    weights = knn_weights(sp.csr_matrix(binary), 5)
    assert np.diff(weights.indptr).max() <= 5
    for row in (0, 17, 123):
        span = slice(weights.indptr[row], weights.indptr[row + 1])
        np.testing.assert_allclose(weights.data[span], cosine[row, weights.indices[span]], 1e-5)
        # Nothing left out is nearer than what was kept.
        left = np.delete(cosine[row], weights.indices[span])
        assert left.max(initial=0) <= weights.data[span].min() + 1e-6


def test_knn_weights_do_not_depend_on_the_threads_or_the_blocks(matrix, monkeypatch):
    """Blocks multiplied on several threads, in blocks smaller with more of them: the same
    neighbours and similarities, in the same order, as one block on one thread."""
    binary = sp.csr_matrix(_binary(matrix))
    alone = knn_weights(binary, 5, workers=1)
    monkeypatch.setattr("training.items.KNN_BLOCK_ITEMS", 48)  # 400 playlists: many blocks
    for workers in (1, 3):
        threaded = knn_weights(binary, 5, workers=workers)
        np.testing.assert_array_equal(threaded.indptr, alone.indptr)
        np.testing.assert_array_equal(threaded.indices, alone.indices)
        np.testing.assert_array_equal(threaded.data, alone.data)


@pytest.mark.parametrize("method", ["ease", "knn"])
def test_block_scores_are_the_best_unseen_playlists_and_look_up_any_pair(matrix, method):
    model = fit_item_model(matrix, ItemParams(method=method, count=20, ease_lambda=50.0))
    assert model.method == method
    binary = _binary(matrix)
    weights = model.weights
    dense_weights = weights.numpy() if method == "ease" else weights.toarray()
    # The model is fitted on the binary matrix; a user's row is scored with its log weights.
    logged = matrix.toarray().astype(np.float64)
    assert not np.allclose(logged[binary > 0], 1.0), "the data needs weights other than 1"
    scores = np.zeros_like(binary)
    scores[:, model.kept] = logged[:, model.kept] @ dense_weights
    users = np.arange(100, 160)
    block = model.block(matrix[users])
    for row, user in enumerate(users):
        picks = block.top_items[row][block.top_items[row] >= 0]
        assert not binary[user, picks].any(), "a seen playlist was picked"
        expected = scores[user, picks]
        np.testing.assert_allclose(block.top_scores[row, : len(picks)], expected, rtol=1e-4)
        assert (np.diff(expected) <= 1e-5).all(), "picks not in score order"
        unseen = np.setdiff1d(model.kept, np.flatnonzero(binary[user]))
        rest = np.setdiff1d(unseen, picks)
        if len(picks) == 20 and len(rest):
            assert scores[user, rest].max() <= expected[-1] + 1e-4
        # Any pair, picked or not: its score; 0 for a playlist the model does not hold.
        every = np.arange(matrix.shape[1])
        looked = block.lookup(np.full(len(every), row), every)
        unseen_cols = np.flatnonzero(binary[user] == 0)
        np.testing.assert_allclose(looked[unseen_cols], scores[user, unseen_cols], atol=1e-4)


def test_auto_chooses_ease_below_the_size_and_knn_above(matrix):
    kept = int(((matrix.toarray() > 0).sum(axis=0) >= 2).sum())
    assert fit_item_model(matrix, ItemParams(ease_max_items=kept)).method == "ease"
    assert fit_item_model(matrix, ItemParams(ease_max_items=kept - 1)).method == "knn"
    assert fit_item_model(matrix, ItemParams(method="none")) is None
    with pytest.raises(ValueError, match="unknown item method 'als'"):
        fit_item_model(matrix, ItemParams(method="als"))


def _rows(pairs: Pairings, user: int):
    span = slice(pairs.indptr[user], pairs.indptr[user + 1])
    return (
        pairs.items[span].tolist(),
        pairs.support[span].tolist(),
        pairs.item_score[span].tolist() if pairs.item_score is not None else None,
    )


def test_item_picks_join_the_neighbours_candidates(matrix, tmp_path):
    params = PairingParams(neighbours=20, candidates=30, method="exact")
    model = fit_item_model(matrix, ItemParams(method="ease", count=15))
    alone = pair_users(matrix, params)
    merged = pair_users(matrix, params, item_model=model)
    assert alone.item_score is None and merged.item_score is not None
    binary = _binary(matrix)
    scores = np.zeros_like(binary)
    scores[:, model.kept] = matrix.toarray()[:, model.kept] @ model.weights.numpy()
    block = model.block(matrix)
    gained = 0
    for user in range(matrix.shape[0]):
        items, support, item_score = _rows(merged, user)
        assert len(items) == len(set(items)) <= 30 + 15
        assert not binary[user, items].any()
        supported = [i for i, s in zip(items, support, strict=True) if s > 0]
        before = alone.items[alone.indptr[user] : alone.indptr[user + 1]]
        before_support = alone.support[alone.indptr[user] : alone.indptr[user + 1]]
        assert supported == before[before_support > 0].tolist()  # same, same order, first
        assert items[: len(supported)] == supported
        picks = block.top_items[user][block.top_items[user] >= 0]
        assert set(picks) <= set(items), user
        gained += len(set(picks) - set(before.tolist()))
        np.testing.assert_allclose(item_score, scores[user, items], atol=1e-4)
        if items:
            assert len(items) >= min(30, matrix.shape[1] - binary[user].sum())
    assert gained > 0, "the item model added nothing the neighbours had not"

    spilled = pair_users(matrix, params, item_model=model, out=tmp_path / "spill")
    for name in ("indptr", "items", "support", "neighbours", "item_score"):
        np.testing.assert_array_equal(getattr(spilled, name), getattr(merged, name))
    spilled.save(tmp_path / "bundle")
    again = Pairings.load(tmp_path / "bundle")
    np.testing.assert_array_equal(again.item_score, merged.item_score)
    pair_users(matrix, params, out=tmp_path / "plain").save(tmp_path / "plain-bundle")
    assert Pairings.load(tmp_path / "plain-bundle").item_score is None


def test_ease_lambda_and_dropout_are_chosen_on_held_out_rows(matrix):
    """λ walked from the start (at the start's dropout), then the dropout at the best λ; each
    walk ends on a rung no neighbour beats; the pair kept is the one whose top 10 picks hold
    most of the held-out rows; given both, no search."""
    from training.items import EASE_DROPOUTS, EASE_LAMBDAS, EASE_START, tune_item_model
    from training.protocol import holdout_mask

    coo = matrix.tocoo()
    held = holdout_mask(coo.row, seed=5)
    kept = sp.csr_matrix((coo.data[~held], (coo.row[~held], coo.col[~held])), shape=matrix.shape)
    params = ItemParams(method="ease", count=20)
    model, recall = tune_item_model(kept, params, coo.row[held], coo.col[held])
    lam, dropout = model.ease_lambda, model.ease_dropout
    lambdas = [value for value in EASE_LAMBDAS if (value, EASE_START[1]) in recall]
    dropouts = [value for value in EASE_DROPOUTS if (lam, value) in recall]
    assert set(recall) == {(value, EASE_START[1]) for value in lambdas} | {
        (lam, value) for value in dropouts
    }
    for ladder, tried, at, key in (
        (EASE_LAMBDAS, lambdas, lam, lambda value: (value, EASE_START[1])),
        (EASE_DROPOUTS, dropouts, dropout, lambda value: (lam, value)),
    ):
        assert EASE_START[ladder is EASE_DROPOUTS] in tried
        first = ladder.index(tried[0])
        assert tried == list(ladder[first : first + len(tried)])  # a walk: no rung skipped
        here = ladder.index(at)
        for rung in (here - 1, here + 1):  # a neighbour either beaten or the ladder's end
            assert rung < 0 or rung >= len(ladder) or recall[key(ladder[rung])] <= recall[key(at)]
    assert recall[lam, dropout] == max(recall.values())
    # The recall it reports is the top 10 picks' share of each user's held-out rows.
    users = np.unique(coo.row[held])
    top = model.block(kept[users]).top_items[:, :10]
    shares = [
        len(set(top[i][top[i] >= 0]) & set(coo.col[held][coo.row[held] == u]))
        / (coo.row[held] == u).sum()
        for i, u in enumerate(users)
    ]
    assert recall[lam, dropout] == pytest.approx(np.mean(shares), abs=1e-9)
    fixed, tried = tune_item_model(
        kept,
        ItemParams(method="ease", count=20, ease_lambda=7.0, ease_dropout=0.2),
        coo.row[held],
        coo.col[held],
    )
    assert (fixed.ease_lambda, fixed.ease_dropout, tried) == (7.0, 0.2, {})
    _, dropouts_only = tune_item_model(
        kept, ItemParams(method="ease", count=20, ease_lambda=7.0), coo.row[held], coo.col[held]
    )
    assert {lam for lam, _ in dropouts_only} == {7.0}
    assert (7.0, EASE_START[1]) in dropouts_only


def test_a_walk_climbs_to_the_peak_of_its_ladder_and_measures_each_rung_once():
    from training.items import _walk

    ladder = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)
    for peak in range(len(ladder)):
        for start in range(len(ladder)):
            measured = []

            def score(value, peak=peak, measured=measured):
                measured.append(value)
                return -abs(ladder.index(value) - peak)

            assert _walk(ladder, ladder[start], score) == ladder[peak]
            assert len(measured) == len(set(measured))
            # The start, one rung the wrong way (unless at an end), the climb and one past it.
            assert len(measured) <= abs(peak - start) + 3
    # Ties stay where they are: a flat ladder ends on its start.
    assert _walk(ladder, 4.0, lambda value: 0.0) == 4.0
    # A start off the ladder is measured and kept.
    assert _walk(ladder, 2.5, lambda value: 0.0) == 2.5


def test_a_model_of_an_earlier_bundle_scores_rows_as_zero_one(matrix, tmp_path):
    from encore.bundle import Bundle
    from training.item_state import load_item_model, save_item_model
    from training.refresh import base_params

    users = np.arange(100, 140)
    weighted = fit_item_model(matrix, ItemParams(method="ease", ease_lambda=50.0))
    binary = fit_item_model(
        matrix, ItemParams(method="ease", ease_lambda=50.0, weighted_rows=False)
    )
    rows = _binary(matrix)[users][:, binary.kept]
    expected = rows @ binary.weights.numpy()
    every = np.arange(matrix.shape[1])
    block = binary.block(matrix[users])
    looked = np.stack([block.lookup(np.full(len(every), r), every) for r in range(len(users))])
    unseen = rows == 0
    np.testing.assert_allclose(looked[:, binary.kept][unseen], expected[unseen], atol=1e-4)
    assert not np.allclose(weighted.block(matrix[users]).top_scores, block.top_scores)
    # The flag survives the state kept between refreshes; a state written before it is 0/1.
    save_item_model(tmp_path, binary, "v1")
    assert load_item_model(tmp_path, "v1")[1].weighted_rows is False
    meta = tmp_path / "item_model" / "meta.json"
    meta.write_text(meta.read_text().replace(', "weighted_rows": false', ""))
    assert "weighted_rows" not in meta.read_text()
    assert load_item_model(tmp_path, "v1")[1].weighted_rows is False
    save_item_model(tmp_path, weighted, "v2")
    assert load_item_model(tmp_path, "v2")[1].weighted_rows is True
    # A bundle trained before the flag refreshes with 0/1 rows; a new one with weights.
    legacy = Bundle(tmp_path, {"hyperparameters": {"dim": 16}})
    assert base_params(legacy).items.weighted_rows is False
    recent = Bundle(tmp_path, {"hyperparameters": {"dim": 16, "item_weighted_rows": True}})
    assert base_params(recent).items.weighted_rows is True


def test_a_refresh_keeps_the_chosen_dropout_and_an_earlier_bundle_stays_plain_ease(
    matrix, tmp_path
):
    from encore.bundle import Bundle
    from training.item_state import load_item_model, save_item_model
    from training.refresh import base_params

    chose = {"ease_lambda": 25.0, "ease_dropout": 0.33}
    recent = Bundle(tmp_path, {"hyperparameters": {}, "chosen_hyperparameters": chose})
    assert (base_params(recent).ease_lambda, base_params(recent).ease_dropout) == (25.0, 0.33)
    legacy = Bundle(
        tmp_path, {"hyperparameters": {}, "chosen_hyperparameters": {"ease_lambda": 25.0}}
    )
    assert (base_params(legacy).ease_lambda, base_params(legacy).ease_dropout) == (25.0, 0.0)
    model = fit_item_model(matrix, ItemParams(method="ease", ease_lambda=25.0, ease_dropout=0.33))
    save_item_model(tmp_path, model, "v1")
    kept = load_item_model(tmp_path, "v1")[1]
    assert kept.ease_dropout == 0.33
    np.testing.assert_array_equal(kept.weights.numpy(), model.weights.numpy())
    meta = tmp_path / "item_model" / "meta.json"
    meta.write_text(meta.read_text().replace(', "ease_dropout": 0.33', ""))
    assert load_item_model(tmp_path, "v1")[1].ease_dropout == 0.0
