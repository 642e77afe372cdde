"""User pairing: cosine neighbours and their candidates, on a matrix worked out by hand."""

from __future__ import annotations

from math import sqrt

import numpy as np
import pytest

from training.matrix import encode, interaction_matrix, low_rank_factors
from training.pairing import PairingParams, Pairings, exact_neighbours, pair_users

# Six users, eight playlists, every weight 1 (so cosine = |A & B| / sqrt(|A| |B|)).
HELD = [
    {0, 1, 4},  # u0
    {0, 1, 4, 5, 6},  # u1
    {2, 4, 5, 6},  # u2
    {2, 3, 4, 5, 6},  # u3: its neighbours hold nothing it has not seen
    {2, 4, 5},  # u4
    {7},  # u5: shares nothing with anyone
]
# Users per playlist: 0:2  1:2  2:3  3:1  4:5  5:4  6:3  7:1
#
# Similarities (overlap / sqrt(sizes)), each user's two best first:
#   u0: u1 3/sqrt(15) = .775 ({0,1,4})   u4 1/3 = .333 ({4})         [u2 1/sqrt(12) = .289]
#   u1: u0 3/sqrt(15) = .775             u2 3/sqrt(20) = .671 ({4,5,6}) [u3 3/5 = .6]
#   u2: u3 4/sqrt(20) = .894 ({2,4,5,6}) u4 3/sqrt(12) = .866 ({2,4,5}) [u1 .671]
#   u3: u2 4/sqrt(20) = .894             u4 3/sqrt(15) = .775 ({2,4,5}) [u1 .6]
#   u4: u2 3/sqrt(12) = .866             u3 3/sqrt(15) = .775           [u1 2/sqrt(15) = .516]
#   u5: nobody
S01, S04 = 3 / sqrt(15), 1 / 3
S12 = 3 / sqrt(20)
S23, S24 = 4 / sqrt(20), 3 / sqrt(12)
S34 = 3 / sqrt(15)


def hand_matrix():
    users = np.array([u for u, items in enumerate(HELD) for _ in items])
    items = np.array([i for held in HELD for i in sorted(held)])
    return interaction_matrix(users, items, np.ones(len(users)), (len(HELD), 8))


def candidates(pairs: Pairings, user: int) -> tuple[list, list, list]:
    span = slice(pairs.indptr[user], pairs.indptr[user + 1])
    return (
        pairs.items[span].tolist(),
        pairs.support[span].tolist(),
        pairs.neighbours[span].tolist(),
    )


def test_exact_neighbours_by_hand():
    idx, sim = exact_neighbours(hand_matrix(), 2)
    assert idx.tolist() == [[1, 4], [0, 2], [3, 4], [2, 4], [2, 3], [-1, -1]]
    expected = [[S01, S04], [S01, S12], [S23, S24], [S23, S34], [S24, S34], [0, 0]]
    np.testing.assert_allclose(sim, expected, rtol=1e-6)


def test_exact_neighbours_pads_when_k_exceeds_the_overlapping_users():
    idx, sim = exact_neighbours(hand_matrix(), 7)  # more than the 5 other users
    assert idx.shape == sim.shape == (6, 7)
    # u0 overlaps u1, u4, u2 and u3 ({4}: 1/sqrt(15) = .258); nobody else.
    assert idx[0].tolist() == [1, 4, 2, 3, -1, -1, -1]
    np.testing.assert_allclose(sim[0], [S01, S04, 1 / sqrt(12), 1 / sqrt(15), 0, 0, 0], rtol=1e-6)
    assert (idx[5] == -1).all() and (sim[5] == 0).all()


def test_pair_users_exact_by_hand():
    pairs = pair_users(hand_matrix(), PairingParams(neighbours=2, candidates=2, method="exact"))
    assert pairs.n_users == 6
    # u0's neighbours u1 {0,1,4,5,6} and u4 {2,4,5} offer 5 (both: S01 + S04), 6 (u1: S01)
    # and 2 (u4: S04); the cap of 2 keeps the first two.
    items, support, count = candidates(pairs, 0)
    assert items == [5, 6]
    np.testing.assert_allclose(support, [S01 + S04, S01], rtol=1e-5)
    assert count == [2, 1]
    # u4's neighbours u2 {2,4,5,6} and u3 {2,3,4,5,6}: 6 (both), then 3 (u3).
    items, support, count = candidates(pairs, 4)
    assert items == [6, 3]
    np.testing.assert_allclose(support, [S24 + S34, S34], rtol=1e-5)
    assert count == [2, 1]


def test_short_lists_are_filled_with_the_most_popular_unseen():
    pairs = pair_users(hand_matrix(), PairingParams(neighbours=2, candidates=2, method="exact"))
    # u1's neighbours offer only 2 (u2 holds it): one popular unseen playlist fills the
    # slate. Unseen and not a candidate: 3 and 7, both held by one user.
    items, support, count = candidates(pairs, 1)
    assert items[0] == 2 and items[1] in {3, 7}
    np.testing.assert_allclose(support, [S12, 0], rtol=1e-5)
    assert count == [1, 0]
    # u2's neighbours offer only 3; unseen: 0 and 1 (two users each) beat 7 (one user).
    items, support, count = candidates(pairs, 2)
    assert items[0] == 3 and items[1] in {0, 1}
    np.testing.assert_allclose(support, [S23, 0], rtol=1e-5)
    assert count == [1, 0]


def test_users_with_nothing_new_from_neighbours_are_cold():
    pairs = pair_users(hand_matrix(), PairingParams(neighbours=2, candidates=2, method="exact"))
    assert candidates(pairs, 3) == ([], [], [])  # neighbours, but nothing unseen
    assert candidates(pairs, 5) == ([], [], [])  # no neighbour at all
    assert pairs.lengths().tolist() == [2, 2, 2, 0, 2, 0]


def test_supported_candidates_come_before_the_fill_and_in_support_order():
    pairs = pair_users(hand_matrix(), PairingParams(neighbours=2, candidates=3, method="exact"))
    items, support, _ = candidates(pairs, 0)
    assert items == [5, 6, 2]  # three supported ones: no fill
    np.testing.assert_allclose(support, [S01 + S04, S01, S04], rtol=1e-5)
    items, support, count = candidates(pairs, 4)
    assert items[:2] == [6, 3] and items[2] in {0, 1}  # then the most popular unseen
    assert support[2] == 0 and count[2] == 0


def test_ties_in_support_go_to_the_more_popular_playlist():
    # u1's single neighbour u0 holds 1 and 2 (same support); 2 has more listeners.
    held = [{0, 1, 2}, {0}, {2, 3}, {2, 4}]
    users = np.array([u for u, items in enumerate(held) for _ in items])
    items = np.array([i for h in held for i in sorted(h)])
    matrix = interaction_matrix(users, items, np.ones(len(users)), (4, 5))
    pairs = pair_users(matrix, PairingParams(neighbours=1, candidates=5, method="exact"))
    # u1 {0}: only neighbour u0 ({0}: 1/sqrt(3)), offering 1 (1 user) and 2 (3 users).
    assert candidates(pairs, 1)[0][:2] == [2, 1]


def test_seen_items_are_never_candidates_by_hand():
    pairs = pair_users(hand_matrix(), PairingParams(neighbours=3, candidates=8, method="exact"))
    for user, seen in enumerate(HELD):
        items = candidates(pairs, user)[0]
        assert not seen & set(items)
        assert len(items) == len(set(items))


def test_pairings_save_and_load_memory_mapped(tmp_path):
    pairs = pair_users(hand_matrix(), PairingParams(neighbours=2, candidates=2, method="exact"))
    pairs.save(tmp_path / "pairings")
    loaded = Pairings.load(tmp_path / "pairings")
    for name in ("indptr", "items", "support", "neighbours"):
        original, read = getattr(pairs, name), getattr(loaded, name)
        assert isinstance(read, np.memmap), name
        assert read.dtype == original.dtype, name
        np.testing.assert_array_equal(read, original)
    assert candidates(loaded, 4) == candidates(pairs, 4)
    in_memory = Pairings.load(tmp_path / "pairings", mmap=False)
    assert not isinstance(in_memory.items, np.memmap)


def test_unknown_method_and_ann_without_factors_are_refused():
    with pytest.raises(ValueError, match="unknown pairing method"):
        pair_users(hand_matrix(), PairingParams(method="magic"))
    with pytest.raises(ValueError, match="user_factors"):
        pair_users(hand_matrix(), PairingParams(method="ann"))


# On generated data


@pytest.fixture(scope="module")
def generated_matrix(tmp_path_factory):
    from training.ingest import read_interactions
    from training.synthetic import SyntheticSpec, generate

    data = generate(
        SyntheticSpec(users=3000, playlists=600, seed=0), tmp_path_factory.mktemp("pairing")
    )
    interactions = read_interactions(data.interactions)
    users, user_codes = encode(interactions.user_ids)
    items, item_codes = encode(interactions.playlist_ids)
    return interaction_matrix(
        user_codes, item_codes, interactions.weights, (len(users), len(items))
    )


@pytest.fixture(scope="module")
def exact_pairs(generated_matrix):
    return pair_users(generated_matrix, PairingParams(method="exact"))


def test_generated_candidates_never_seen_and_capped(generated_matrix, exact_pairs):
    lengths = exact_pairs.lengths()
    assert lengths.max() <= 75
    owner = np.repeat(np.arange(exact_pairs.n_users), lengths)
    assert generated_matrix[owner, exact_pairs.items.astype(np.int64)].max() == 0
    # Support never increases along a user's list (fill, at 0, comes last).
    step = np.diff(exact_pairs.support.astype(np.float64))
    inside = owner[1:] == owner[:-1]
    assert (step[inside] <= 1e-6).all()


def test_ann_candidates_overlap_the_exact_ones(generated_matrix, exact_pairs):
    """faiss over low-rank factors finds most of what the exact product finds.

    Measured on this data (seeds 0 and 1): the ann list holds 94% of the exact top 20 and
    74% of the whole exact list; the 75 most popular unseen playlists hold 61% and 48%.
    """
    from training.evaluate import popular_unseen
    from training.matrix import popularity

    user_factors, _ = low_rank_factors(generated_matrix, dim=128)
    ann = pair_users(generated_matrix, PairingParams(method="ann"), user_factors=user_factors)
    popular = popular_unseen(generated_matrix, popularity(generated_matrix), 75)

    def share(of: Pairings, top: int, within) -> float:
        shares = []
        for user in range(of.n_users):
            wanted = of.items[of.indptr[user] : of.indptr[user + 1]][:top]
            if len(wanted):
                shares.append(len(set(wanted.tolist()) & set(within(user))) / len(wanted))
        return float(np.mean(shares))

    def ann_list(user):
        return ann.items[ann.indptr[user] : ann.indptr[user + 1]].tolist()

    ann_top = share(exact_pairs, 20, ann_list)
    popular_top = share(exact_pairs, 20, lambda user: popular[user].tolist())
    ann_all = share(exact_pairs, 75, ann_list)
    assert ann_top >= 0.85, ann_top
    assert ann_top >= popular_top + 0.2, (ann_top, popular_top)
    assert ann_all >= 0.65, ann_all
    assert (ann.lengths() > 0).mean() >= (exact_pairs.lengths() > 0).mean() - 0.02


def _rows_of(pairs: Pairings, rows) -> list[tuple[list, list, list]]:
    return [candidates(pairs, user) for user in rows]


@pytest.mark.parametrize("method", ["exact", "ann"])
def test_pairing_some_users_gives_their_rows_of_pairing_everyone(generated_matrix, method):
    """A training fold pairs only the users it can learn from: their neighbours are still
    searched among all users, so each gets exactly what pairing everyone gives it."""
    factors = low_rank_factors(generated_matrix, dim=32)[0] if method == "ann" else None
    params = PairingParams(method=method)
    everyone = pair_users(generated_matrix, params, user_factors=factors)
    rows = np.sort(np.random.default_rng(3).choice(generated_matrix.shape[0], 400, replace=False))
    some = pair_users(generated_matrix, params, user_factors=factors, rows=rows)
    assert some.n_users == len(rows)
    mine = _rows_of(some, range(len(rows)))
    theirs = _rows_of(everyone, rows)
    if method == "exact":
        assert mine == theirs
    else:  # the same search; only float rounding of the batched products may differ
        same = [a[0] == b[0] for a, b in zip(mine, theirs, strict=True)]
        assert np.mean(same) >= 0.99, np.mean(same)


def test_pairings_spilled_to_disk_equal_those_in_memory(generated_matrix, exact_pairs, tmp_path):
    """`encore train` writes the final pairings block by block (7.5 GB at 10M users)."""
    spilled = pair_users(generated_matrix, PairingParams(method="exact"), out=tmp_path / "spill")
    assert isinstance(spilled.items, np.memmap)
    for name in ("indptr", "items", "support", "neighbours"):
        assert getattr(spilled, name).dtype == getattr(exact_pairs, name).dtype, name
        np.testing.assert_array_equal(getattr(spilled, name), getattr(exact_pairs, name))
    assert not list((tmp_path / "spill").glob("*.raw"))
    spilled.save(tmp_path / "bundle")
    again = Pairings.load(tmp_path / "bundle", mmap=False)
    np.testing.assert_array_equal(again.items, exact_pairs.items)
    np.testing.assert_array_equal(again.indptr, exact_pairs.indptr)
