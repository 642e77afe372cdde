"""The growing interactions source: partitions read once, bad ones set aside, state rebuilt."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from encore.errors import EncoreError
from training.source import ingest, readmit, source_state, with_likes


def _write(path: Path, rows: list[tuple[int, int, float]]) -> Path:
    path.write_text("user_id,playlist_id,weight\n" + "".join(f"{u},{p},{w}\n" for u, p, w in rows))
    return path


@pytest.fixture
def source(tmp_path: Path) -> Path:
    directory = tmp_path / "interactions"
    directory.mkdir()
    _write(directory / "2026-12-01.csv", [(1, 10, 1.0), (2, 11, 2.0)])
    return directory


def test_each_partition_is_read_once_and_rows_accumulate(source: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = ingest(source, state)
    assert first.new_partitions == ["2026-12-01.csv"] and first.new_rows == 2 and first.rebuilt
    again = ingest(source, state)
    assert again.new_partitions == [] and again.new_rows == 0 and not again.rebuilt
    assert again.interactions.fingerprint == first.interactions.fingerprint
    _write(source / "2026-12-02.csv", [(3, 10, 1.0)])
    (source / ".2026-12-03.csv.partial").write_text("being written")  # not a partition yet
    second = ingest(source, state)
    assert second.new_partitions == ["2026-12-02.csv"] and not second.rebuilt
    assert second.interactions.user_ids.tolist() == [1, 2, 3]
    assert second.interactions.weights.tolist() == [1.0, 2.0, 1.0]
    assert second.interactions.fingerprint != first.interactions.fingerprint


def test_a_bad_partition_is_set_aside_with_file_line_and_column(
    source: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    ingest(source, state)
    bad = source / "2026-12-02.csv"
    bad.write_text("user_id,playlist_id,weight\n4,12,1\n5,oops,1\n")
    _write(source / "2026-12-03.csv", [(6, 13, 1.0)])
    result = ingest(source, state)
    assert list(result.set_aside) == ["2026-12-02.csv"]
    error = result.set_aside["2026-12-02.csv"]
    assert str(bad) in error and "line 3" in error and "'playlist_id'" in error
    assert result.new_partitions == ["2026-12-03.csv"]  # the night goes on with the rest
    assert result.interactions.user_ids.tolist() == [1, 2, 6]
    assert source_state(state).set_aside() == {"2026-12-02.csv": error}
    # Unchanged, it stays aside; re-admitted by an operator, it is read again (and fails again).
    assert ingest(source, state).set_aside == {}
    readmit(state, "2026-12-02.csv")
    assert list(ingest(source, state).set_aside) == ["2026-12-02.csv"]
    # Fixed on disk, it is read at the next ingest without being re-admitted.
    bad.write_text("user_id,playlist_id,weight\n4,12,1\n5,14,1\n")
    fixed = ingest(source, state)
    assert fixed.new_partitions == ["2026-12-02.csv"] and fixed.set_aside == {}
    assert sorted(fixed.interactions.user_ids.tolist()) == [1, 2, 4, 5, 6]
    with pytest.raises(EncoreError, match="not set aside"):
        readmit(state, "2026-12-02.csv")


@pytest.mark.parametrize("damage", ["manifest", "rows", "missing"])
def test_a_corrupt_or_missing_state_is_rebuilt_not_fatal(
    source: Path, tmp_path: Path, damage: str
) -> None:
    state = tmp_path / "state"
    _write(source / "2026-12-02.csv", [(3, 10, 1.0)])
    before = ingest(source, state).interactions
    if damage == "manifest":
        (state / "ingest.json").write_text("{not json")
    elif damage == "rows":
        (state / "rows" / "weights.npy").write_bytes(b"\x93NUMPY garbage")
    else:
        for path in (state / "rows").iterdir():
            path.unlink()
    after = ingest(source, state)
    assert after.rebuilt
    assert after.interactions.user_ids.tolist() == before.user_ids.tolist()
    assert after.interactions.fingerprint == before.fingerprint


def test_a_rewritten_partition_is_read_again_with_all_the_others(
    source: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    _write(source / "2026-12-02.csv", [(3, 10, 1.0)])
    ingest(source, state)
    rewritten = _write(source / "2026-12-01.csv", [(1, 10, 1.0)])
    os.utime(rewritten, ns=(1, 1))
    result = ingest(source, state)
    assert not result.rebuilt and result.new_partitions == ["2026-12-01.csv"]
    assert result.interactions.user_ids.tolist() == [3, 1]  # the old rows of 12-01 are gone
    again = ingest(tmp_path / "interactions", tmp_path / "rebuilt")  # the same rows, read anew
    assert sorted(again.interactions.user_ids.tolist()) == [1, 3]


def test_rows_of_a_deleted_partition_are_kept(source: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    _write(source / "2026-12-02.csv", [(3, 10, 1.0)])
    ingest(source, state)
    (source / "2026-12-01.csv").unlink()
    assert ingest(source, state).interactions.user_ids.tolist() == [1, 2, 3]
    # Another partition rewritten: only its rows are read again, the deleted one's stay.
    rewritten = _write(source / "2026-12-02.csv", [(4, 10, 1.0)])
    os.utime(rewritten, ns=(1, 1))
    assert ingest(source, state).interactions.user_ids.tolist() == [1, 2, 4]
    # Rows lost with a partition gone: refused, not silently rebuilt without them.
    (state / "rows" / "user_ids.npy").unlink()
    with pytest.raises(EncoreError, match=r"2026-12-01\.csv are no longer in"):
        ingest(source, state)


def test_one_file_is_a_source_of_one_partition(tmp_path: Path) -> None:
    path = _write(tmp_path / "all.csv", [(1, 10, 1.0)])
    assert ingest(path, tmp_path / "state").interactions.playlist_ids.tolist() == [10]
    with pytest.raises(EncoreError, match="neither a file nor a directory"):
        ingest(tmp_path / "nowhere", tmp_path / "state")


def test_likes_are_rows_of_their_weight(source: Path, tmp_path: Path) -> None:
    base = ingest(source, tmp_path / "state").interactions
    liked = with_likes(base, np.array([7]), np.array([11]), 2.5)
    assert liked.user_ids.tolist() == [1, 2, 7] and liked.weights.tolist() == [1.0, 2.0, 2.5]
    assert liked.fingerprint != base.fingerprint
    assert with_likes(base, np.array([7]), np.array([11]), 0.0) is base


def test_old_refreshed_versions_are_pruned_but_the_protected_ones(tmp_path: Path) -> None:
    import json

    from encore.bundle import list_bundles, promote
    from tests.random_bundle import build_random_bundle
    from training.freshness import prune_refreshed

    bundles = tmp_path / "bundles"
    trained = build_random_bundle(
        bundles, users=20, playlists=10, candidates=5, version="v0-trained"
    )
    versions = []
    for night in range(1, 7):
        bundle = build_random_bundle(
            bundles,
            users=20,
            playlists=10,
            candidates=5,
            version=f"v{night}-refreshed",
            promote_it=False,
        )
        meta = json.loads((bundle.path / "metadata.json").read_text())
        meta["refreshed_from"] = trained.version
        (bundle.path / "metadata.json").write_text(json.dumps(meta))
        versions.append(bundle.version)
    promote(bundles, "v5-refreshed")
    deleted = prune_refreshed(bundles, keep=2, protect={"v2-refreshed"})
    assert deleted == ["v1-refreshed", "v3-refreshed", "v4-refreshed"]
    left = [b.version for b in list_bundles(bundles)]
    assert left == ["v0-trained", "v2-refreshed", "v5-refreshed", "v6-refreshed"]


def test_train_without_interactions_reads_the_source(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from encore.bundle import promoted_bundle
    from encore.cli import app
    from encore.settings import get_settings

    rng = np.random.default_rng(0)
    for day in (2, 3):
        rows = [(int(u), int(p), 1.0) for u, p in rng.integers(0, 60, (400, 2))]
        _write(source / f"2026-12-0{day}.csv", rows)
    monkeypatch.setenv("ENCORE_INTERACTIONS", str(source))
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["train", "--no-evaluate"])
    assert result.exit_code == 0, (result.output, result.exception)
    settings = get_settings()
    bundle = promoted_bundle(settings.bundles_dir)
    state = source_state(settings.ingest_dir)
    assert bundle.metadata["data_fingerprint"] == state.fingerprint
    assert bundle.metadata["data"]["rows"] == state.rows == 802
    monkeypatch.delenv("ENCORE_INTERACTIONS")
    get_settings.cache_clear()
    refused = CliRunner().invoke(app, ["train"])
    assert refused.exit_code != 0 and "ENCORE_INTERACTIONS" in refused.output
