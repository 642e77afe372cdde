"""Ingest: every bad input stops with an error naming file, line, column and value;
the formats docs/architecture.md promises (CSV/TSV/Parquet, header or not, CRLF, BOM) just work."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.ingest import InputError, read_catalog, read_interactions

HEADER = b"user_id,playlist_id,weight\n"
GOOD_ROWS = b"1,10,3\n2,20,1.5\n"


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def assert_names(err: InputError, path: Path, line: int | None, column: str | None, value):
    """The error, as attributes and as the message a user reads, names what was wrong."""
    message = str(err)
    assert message.startswith(str(path)), message
    assert err.line == line
    if line is not None:
        assert f", line {line}" in message
    assert err.column == column
    if column is not None:
        assert repr(column) in message
    assert err.value == value
    if value is not None:
        assert repr(value) in message


# (name, rows after the good header and two good rows, bad line, column, value as written)
BAD_VALUES = [
    ("non-integer id", b"3,x,1\n", 4, "playlist_id", "x"),
    ("fractional id", b"3.5,30,1\n", 4, "user_id", "3.5"),
    ("negative id", b"3,-30,1\n", 4, "playlist_id", "-30"),
    ("id just over int64", b"9223372036854775808,30,1\n", 4, "user_id", "9223372036854775808"),
    ("id over 64 bits", b"3,18446744073709551616,1\n", 4, "playlist_id", "18446744073709551616"),
    ("zero weight", b"3,30,0\n", 4, "weight", "0"),
    ("negative weight", b"3,30,-1\n", 4, "weight", "-1"),
    ("non-numeric weight", b"3,30,lots\n", 4, "weight", "lots"),
    ("nan weight", b"3,30,nan\n", 4, "weight", "nan"),
    ("infinite weight", b"3,30,inf\n", 4, "weight", "inf"),
    ("non-UTF-8 weight", b"3,30,\xff\n", 4, "weight", b"\xff"),
    ("non-UTF-8 id", b"3,3\xe90,1\n", 4, "playlist_id", b"3\xe90"),
]


@pytest.mark.parametrize(
    ("rows", "line", "column", "value"),
    [case[1:] for case in BAD_VALUES],
    ids=[case[0] for case in BAD_VALUES],
)
def test_bad_value_names_file_line_column_and_value(tmp_path, rows, line, column, value):
    path = write(tmp_path, "interactions.csv", HEADER + GOOD_ROWS + rows + b"4,40,2\n")
    with pytest.raises(InputError) as caught:
        read_interactions(path)
    assert_names(caught.value, path, line, column, value)


def test_bad_value_later_in_a_large_file_names_its_exact_line(tmp_path):
    rows = b"".join(b"%d,%d,1\n" % (i, i % 97) for i in range(50_000))
    path = write(tmp_path, "big.csv", HEADER + rows + b"7,-7,1\n" + rows)
    with pytest.raises(InputError) as caught:
        read_interactions(path)
    assert_names(caught.value, path, 50_002, "playlist_id", "-7")


@pytest.mark.parametrize(
    ("rows", "found"), [(b"3,30\n", 2), (b"3,30,1,9\n", 4)], ids=["too few", "too many"]
)
def test_wrong_field_count_names_the_line_and_its_text(tmp_path, rows, found):
    path = write(tmp_path, "interactions.csv", HEADER + GOOD_ROWS + rows)
    with pytest.raises(InputError) as caught:
        read_interactions(path)
    assert_names(caught.value, path, 4, None, rows.decode().strip())
    assert f"expected 3 fields, found {found}" in str(caught.value)


def test_missing_column_in_header_names_it(tmp_path):
    path = write(tmp_path, "interactions.csv", b"user_id,item,weight\n1,2,3\n")
    with pytest.raises(InputError) as caught:
        read_interactions(path)
    assert_names(caught.value, path, 1, None, None)
    assert "missing column 'playlist_id'" in str(caught.value)
    assert "--columns" in str(caught.value)  # says how to read a header-less file


def test_non_utf8_header_names_line_one(tmp_path):
    path = write(tmp_path, "interactions.csv", b"user_id,playlist_id,w\xe9ight\n1,2,3\n")
    with pytest.raises(InputError) as caught:
        read_interactions(path)
    assert_names(caught.value, path, 1, None, None)
    assert "UTF-8" in str(caught.value)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty"), (HEADER, "no rows"), (b"user_id\tplaylist_id\r\n", "no rows")],
    ids=["empty", "header only", "header only, CRLF"],
)
def test_files_without_rows_are_refused(tmp_path, content, reason):
    path = write(tmp_path, "interactions.tsv" if b"\t" in content else "x.csv", content)
    with pytest.raises(InputError) as caught:
        read_interactions(path)
    assert str(caught.value).startswith(str(path))
    assert reason in str(caught.value)


def test_missing_file_is_an_input_error(tmp_path):
    path = tmp_path / "nowhere.csv"
    with pytest.raises(InputError) as caught:
        read_interactions(path)
    assert str(caught.value).startswith(str(path))
    assert "cannot read" in str(caught.value)


def test_directory_is_an_input_error(tmp_path):
    with pytest.raises(InputError) as caught:
        read_interactions(tmp_path)
    assert str(caught.value).startswith(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_an_input_error(tmp_path):
    path = write(tmp_path, "secret.csv", HEADER + GOOD_ROWS)
    path.chmod(0)
    with pytest.raises(InputError) as caught:
        read_interactions(path)
    assert str(caught.value).startswith(str(path))


def test_header_less_columns_must_be_known(tmp_path):
    path = write(tmp_path, "x.csv", GOOD_ROWS)
    with pytest.raises(InputError, match="unknown column 'listens'"):
        read_interactions(path, columns=["user_id", "playlist_id", "listens"])
    with pytest.raises(InputError, match="must include 'playlist_id'"):
        read_interactions(path, columns=["user_id", "_", "weight"])


# What must work


def test_crlf_and_bom(tmp_path):
    path = write(
        tmp_path,
        "interactions.csv",
        b"\xef\xbb\xbfuser_id,playlist_id,weight\r\n1,10,3\r\n2,20,1.5\r\n",
    )
    data = read_interactions(path)
    assert data.user_ids.tolist() == [1, 2]
    assert data.playlist_ids.tolist() == [10, 20]
    assert data.weights.tolist() == [3.0, 1.5]
    assert data.user_ids.dtype == np.int64
    assert data.weights.dtype == np.float32


def test_crlf_bad_row_still_names_its_line(tmp_path):
    path = write(tmp_path, "x.csv", b"\xef\xbb\xbfuser_id,playlist_id\r\n1,10\r\n2,-1\r\n")
    with pytest.raises(InputError) as caught:
        read_interactions(path)
    assert_names(caught.value, path, 3, "playlist_id", "-1")


def test_tsv_with_header_and_default_weight(tmp_path):
    path = write(tmp_path, "interactions.tsv", b"playlist_id\tuser_id\n10\t1\n20\t2\n10\t2\n")
    data = read_interactions(path)
    assert data.user_ids.tolist() == [1, 2, 2]  # columns found by name, not position
    assert data.playlist_ids.tolist() == [10, 20, 10]
    assert data.weights.tolist() == [1.0, 1.0, 1.0]


def test_header_less_with_columns_and_sep(tmp_path):
    path = write(tmp_path, "listens.txt", b"10;1;7\n20;2;1\n")
    data = read_interactions(path, columns=["playlist_id", "user_id", "weight"], sep=";")
    assert data.user_ids.tolist() == [1, 2]
    assert data.playlist_ids.tolist() == [10, 20]
    assert data.weights.tolist() == [7.0, 1.0]


def test_header_less_skipped_column_and_bad_line(tmp_path):
    path = write(tmp_path, "listens.txt", b"1|x|10\n2|y|20\n3|z|-30\n")
    columns = ["user_id", "_", "playlist_id"]
    with pytest.raises(InputError) as caught:
        read_interactions(path, columns=columns, sep="|")
    assert_names(caught.value, path, 3, "playlist_id", "-30")  # no header: data starts at 1
    path.write_bytes(b"1|x|10\n2|y|20\n")
    assert read_interactions(path, columns=columns, sep="|").playlist_ids.tolist() == [10, 20]


@pytest.mark.parametrize(
    "stamps",
    [
        (b"1700000000", b"1704067200"),
        (b"2023-11-14T22:13:20Z", b"2024-01-01T00:00:00Z"),  # Arrow reads these itself
        (b"2023/11/14 22:13:20", b"2024/01/01 00:00:00"),  # Arrow does not, pandas does
        (b"2023-11-14T22:13:20Z", b"2024-01-01"),  # two formats
        (b"1700000000", b"2024-01-01"),  # epoch seconds and a date
    ],
)
def test_timestamps_are_read_as_epoch_seconds(tmp_path, stamps):
    rows = b"".join(b"%d,2,%s\n" % (i, stamp) for i, stamp in enumerate(stamps))
    path = write(tmp_path, "x.csv", b"user_id,playlist_id,timestamp\n" + rows)
    assert read_interactions(path).timestamps.tolist() == [1_700_000_000, 1_704_067_200]


def test_bad_timestamp_names_its_line(tmp_path):
    path = write(tmp_path, "x.csv", b"user_id,playlist_id,timestamp\n1,2,2024-01-01\n1,3,soon\n")
    with pytest.raises(InputError) as caught:
        read_interactions(path)
    assert_names(caught.value, path, 3, "timestamp", "soon")


def test_parquet_good_file(tmp_path):
    path = tmp_path / "interactions.parquet"
    pq.write_table(
        pa.table({"user_id": [5, 6, 5], "playlist_id": [1, 1, 2], "weight": [2.0, 1.0, 4.0]}),
        path,
    )
    data = read_interactions(path)
    assert data.user_ids.tolist() == [5, 6, 5]
    assert data.playlist_ids.tolist() == [1, 1, 2]
    assert data.weights.tolist() == [2.0, 1.0, 4.0]


PARQUET_BAD = [
    ("negative id", {"user_id": [1, 2, 3], "playlist_id": [1, -2, 3]}, 2, "playlist_id", -2),
    (
        "zero weight",
        {"user_id": [1, 2, 3], "playlist_id": [1, 2, 3], "weight": [1.0, 1.0, 0.0]},
        3,
        "weight",
        0.0,
    ),
    ("text id", {"user_id": ["1", "2", "x"], "playlist_id": [1, 2, 3]}, 3, "user_id", "x"),
    (
        "uint64 id over int64",
        {"user_id": pa.array([1, 2**64 - 1, 3], pa.uint64()), "playlist_id": [1, 2, 3]},
        2,
        "user_id",
        2**64 - 1,
    ),
    ("missing id", {"user_id": [1, None, 3], "playlist_id": [1, 2, 3]}, 2, "user_id", None),
]


@pytest.mark.parametrize(
    ("columns", "row", "column", "value"),
    [case[1:] for case in PARQUET_BAD],
    ids=[case[0] for case in PARQUET_BAD],
)
def test_parquet_bad_value_names_the_row(tmp_path, columns, row, column, value):
    path = tmp_path / "interactions.parquet"
    pq.write_table(pa.table(columns), path)
    with pytest.raises(InputError) as caught:
        read_interactions(path)
    assert_names(caught.value, path, row, column, value)


def test_parquet_that_is_not_parquet(tmp_path):
    path = write(tmp_path, "interactions.parquet", b"user_id,playlist_id\n1,2\n")
    with pytest.raises(InputError, match="not a readable Parquet file") as caught:
        read_interactions(path)
    assert str(caught.value).startswith(str(path))


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "interactions.parquet"
    pq.write_table(pa.table({"user_id": [1], "item": [2]}), path)
    with pytest.raises(InputError, match="missing column 'playlist_id'"):
        read_interactions(path)


def test_fingerprint_follows_content(tmp_path):
    a = write(tmp_path, "a.csv", HEADER + GOOD_ROWS)
    b = write(tmp_path, "b.csv", HEADER + GOOD_ROWS)
    c = write(tmp_path, "c.csv", HEADER + GOOD_ROWS + b"3,30,1\n")
    assert read_interactions(a).fingerprint == read_interactions(b).fingerprint
    assert read_interactions(a).fingerprint != read_interactions(c).fingerprint


def test_lastfm_user_artists_loads_as_it_is(lastfm):
    """Tab-separated, no header, CRLF: read as user_id, playlist_id, weight."""
    data = read_interactions(lastfm / "user_artists.dat")
    assert len(data) == 92_834
    assert (data.user_ids[0], data.playlist_ids[0], data.weights[0]) == (2, 51, 13_883.0)
    assert len(np.unique(data.user_ids)) == 1_892
    assert len(np.unique(data.playlist_ids)) == 17_632
    assert (data.weights > 0).all()


# Catalogs


def test_catalog_names_with_quotes_ampersands_and_any_script(tmp_path):
    path = write(
        tmp_path,
        "catalog.csv",
        'playlist_id,name\n1,"""Quoted"" Picks"\n2,Rock & Roll\n3,東京 Nights\n'
        '4,"Comma, Inc."\n5,Ελληνικά\n6,<script>alert(1)</script>\n'.encode(),
    )
    names = dict(read_catalog(path).itertuples(index=False))
    assert names == {
        1: '"Quoted" Picks',
        2: "Rock & Roll",
        3: "東京 Nights",
        4: "Comma, Inc.",
        5: "Ελληνικά",
        6: "<script>alert(1)</script>",
    }


def test_tsv_catalog_keeps_quotes_verbatim(tmp_path):
    path = write(
        tmp_path,
        "catalog.tsv",
        'id\tname\n1\t"Weird Al" Yankovic\n2\tHabib Koité & Bamada\n3\t宇多田ヒカル\n'.encode(),
    )
    names = dict(read_catalog(path).itertuples(index=False))
    assert names == {1: '"Weird Al" Yankovic', 2: "Habib Koité & Bamada", 3: "宇多田ヒカル"}


def test_catalog_bad_id_names_its_line(tmp_path):
    path = write(tmp_path, "catalog.csv", b"playlist_id,name\n1,One\nseven,Seven\n")
    with pytest.raises(InputError) as caught:
        read_catalog(path)
    assert_names(caught.value, path, 3, "playlist_id", "seven")


def test_catalog_parquet(tmp_path):
    path = tmp_path / "catalog.parquet"
    pq.write_table(pa.table({"playlist_id": [2, 1], "name": ["Two & Two", "「一」"]}), path)
    assert dict(read_catalog(path).itertuples(index=False)) == {2: "Two & Two", 1: "「一」"}


def test_lastfm_artists_catalog(lastfm):
    catalog = read_catalog(lastfm / "artists.dat").set_index("playlist_id")["name"]
    assert len(catalog) == 17_632
    assert catalog[1686] == '"Weird Al" Yankovic'
    assert catalog[16861] == "Habib Koité & Bamada"
    assert catalog[374] == "宇多田ヒカル"


# The CLI error path


@pytest.fixture
def restore_logging():
    """`encore.cli.main` configures logging for the process; put the test's back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_cli_train_on_bad_file_reports_without_traceback_and_writes_nothing(
    tmp_path, monkeypatch, capsys, restore_logging
):
    """Through `main`, the `encore` entry point, in process (a subprocess pays ~15 s of
    imports): exit status 1, the file:line message on one line, no traceback, no bundle."""
    from encore import cli

    bad = write(tmp_path, "bad.csv", HEADER + GOOD_ROWS + b"3,30,-1\n")
    monkeypatch.setattr(sys, "argv", ["encore", "train", "--interactions", str(bad)])
    monkeypatch.setattr(cli.console, "width", 40)  # a narrow terminal must not break the line
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    expected = f"{bad}, line 4, column 'weight': weight must be a positive number (value '-1')"
    assert err.strip().splitlines() == [f"error: {expected}"]
    home = Path(os.environ["ENCORE_HOME"])
    assert not (home / "bundles").exists() or not any((home / "bundles").iterdir())


def test_cli_error_with_markup_like_value_is_printed_verbatim(
    tmp_path, monkeypatch, capsys, restore_logging
):
    from encore import cli

    bad = write(tmp_path, "bad.csv", HEADER + b"1,[bold]x[/bold],1\n")
    monkeypatch.setattr(sys, "argv", ["encore", "train", "--interactions", str(bad)])
    with pytest.raises(SystemExit):
        cli.main()
    assert "(value '[bold]x[/bold]')" in capsys.readouterr().err
