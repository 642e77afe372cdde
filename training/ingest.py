"""Reading interactions and catalogs: CSV, TSV or Parquet, with or without a header.

The fast path parses with pyarrow and validates with numpy. When anything is wrong, a
line-by-line scan with the ``csv`` module finds the first bad row, so the error names the
exact file, line, column and value. Nothing is returned (so nothing is written) on error.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from encore.errors import InputError
from training.row_scan import (
    ID_COLUMNS,
    INTERACTION_COLUMNS,
    MAX_ID,
    parse_float,
    parse_int,
    parse_timestamp,
    scan_for_error,
)

logger = logging.getLogger("encore.ingest")

REQUIRED = ("user_id", "playlist_id")
PARQUET_SUFFIXES = {".parquet", ".pq"}
TAB_SUFFIXES = {".tsv", ".tab", ".dat"}


@dataclass(frozen=True)
class Interactions:
    """Validated interactions in file order (one entry per row)."""

    user_ids: np.ndarray  # int64
    playlist_ids: np.ndarray  # int64
    weights: np.ndarray  # float32, > 0; 1.0 where the file has no weight column
    timestamps: np.ndarray | None  # int64 epoch seconds, when the file has them
    path: Path
    fingerprint: str

    def __len__(self) -> int:
        return len(self.user_ids)

    def release_rows(self) -> None:
        """Drop the rows, for a holder done with them that cannot drop the object (training,
        once it has encoded them: 1.85 GB at 10M users). Path and fingerprint stay."""
        for name, dtype in (("user_ids", np.int64), ("playlist_ids", np.int64)):
            object.__setattr__(self, name, np.zeros(0, dtype=dtype))
        object.__setattr__(self, "weights", np.zeros(0, dtype=np.float32))
        object.__setattr__(self, "timestamps", None)


def read_interactions(
    path: str | Path, *, columns: list[str] | None = None, sep: str | None = None
) -> Interactions:
    """Read and validate an interactions file; raise :class:`InputError` naming the bad row."""
    path = Path(path)
    _check_readable(path)
    if columns is not None:
        _check_column_names(path, columns)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        frame, unit = _read_parquet(path, columns), "row"
    else:
        frame, unit = _read_delimited(path, columns, sep), "line"
    # Arrow's allocator keeps the freed file table for reuse: 10M users' rows held ~2 GB more
    # than the columns themselves until the end of training.
    pa.default_memory_pool().release_unused()
    return Interactions(
        user_ids=frame["user_id"],
        playlist_ids=frame["playlist_id"],
        weights=frame.get("weight", np.ones(len(frame["user_id"]), dtype=np.float32)),
        timestamps=frame.get("timestamp"),
        path=path,
        fingerprint=_fingerprint(path, columns, sep, unit),
    )


def read_catalog(path: str | Path, *, sep: str | None = None) -> pd.DataFrame:
    """Read a playlist catalog with columns ``playlist_id`` (or ``id``) and ``name``."""
    path = Path(path)
    _check_readable(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        frame = pq.read_table(path).to_pandas()
        first_data_line = 0
    else:
        delimiter = sep or _guess_separator(path)
        try:
            frame = pd.read_csv(
                path,
                sep=delimiter,
                dtype=str,
                keep_default_na=False,
                encoding="utf-8-sig",
                # Tab-separated catalogs carry names such as '"Weird Al" Yankovic' verbatim.
                quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL,
                usecols=lambda name: name in {"playlist_id", "id", "name"},
            )
        except UnicodeDecodeError as exc:
            raise InputError(path, "the catalog is not UTF-8 text") from exc
        except (pd.errors.ParserError, ValueError) as exc:
            raise InputError(path, f"could not parse the catalog: {exc}") from exc
        first_data_line = 2
    if "playlist_id" not in frame.columns and "id" in frame.columns:
        frame = frame.rename(columns={"id": "playlist_id"})
    for column in ("playlist_id", "name"):
        if column not in frame.columns:
            raise InputError(path, f"missing column {column!r} in the catalog", line=1)
    ids = pd.to_numeric(frame["playlist_id"], errors="coerce")
    bad = ids.isna() | (ids < 0)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(
            path,
            "playlist_id is not a non-negative integer",
            line=row + first_data_line if first_data_line else None,
            column="playlist_id",
            value=frame["playlist_id"].iloc[row],
        )
    return pd.DataFrame(
        {"playlist_id": ids.astype(np.int64), "name": frame["name"].astype(str)}
    ).drop_duplicates("playlist_id", keep="last")


def _check_readable(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            head = handle.read(1)
    except OSError as exc:
        raise InputError(path, f"cannot read the file: {exc.strerror or exc}") from exc
    if not head:
        raise InputError(path, "the file is empty")


def _check_column_names(path: Path, columns: list[str]) -> None:
    unknown = [name for name in columns if name not in INTERACTION_COLUMNS and name != "_"]
    if unknown:
        raise InputError(
            path,
            f"unknown column {unknown[0]!r} in --columns; use {', '.join(INTERACTION_COLUMNS)} "
            "or _ to skip one",
        )
    for name in REQUIRED:
        if name not in columns:
            raise InputError(path, f"--columns must include {name!r}")


def _guess_separator(path: Path) -> str:
    if path.suffix.lower() in TAB_SUFFIXES:
        return "\t"
    if path.suffix.lower() == ".csv":
        return ","
    with path.open("rb") as handle:
        first = handle.readline()
    return "\t" if b"\t" in first else ","


def _header_fields(path: Path, delimiter: str) -> list[str]:
    with path.open("rb") as handle:
        raw = handle.readline()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(path, "the file is not UTF-8 text", line=1) from exc
    return [field.strip() for field in text.rstrip("\r\n").split(delimiter)]


def _looks_like_data(fields: list[str]) -> bool:
    return all(field.lstrip("-").replace(".", "", 1).isdigit() for field in fields if field)


def _read_delimited(path: Path, columns: list[str] | None, sep: str | None) -> dict:
    delimiter = sep or _guess_separator(path)
    first = _header_fields(path, delimiter)
    if columns is None and _looks_like_data(first) and 2 <= len(first) <= 4:
        columns = list(INTERACTION_COLUMNS[: len(first)])
        logger.warning(
            "%s has no header row: reading its columns as %s (pass --columns to choose)",
            path,
            ",".join(columns),
        )
    has_header = columns is None
    names = first if has_header else columns
    if has_header:
        for name in REQUIRED:
            if name not in names:
                raise InputError(
                    path,
                    f"missing column {name!r} in the header {names!r}; a file without a "
                    "header needs --columns, for example --columns user_id,playlist_id,weight",
                    line=1,
                )
    wanted = [name for name in INTERACTION_COLUMNS if name in names]
    types = {"user_id": pa.int64(), "playlist_id": pa.int64(), "weight": pa.float64()}
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(
                column_names=[f"_{i}" if n == "_" else n for i, n in enumerate(names)],
                skip_rows=1 if has_header else 0,
                block_size=1 << 24,
            ),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(
                column_types={k: v for k, v in types.items() if k in wanted},
                include_columns=wanted,
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )
        frame = _validate(table, wanted)
    except (pa.ArrowInvalid, ValueError) as exc:
        scan_for_error(path, delimiter, names, has_header)
        raise InputError(path, f"could not parse the file: {exc}") from exc
    if frame is None:
        scan_for_error(path, delimiter, names, has_header)
        raise InputError(path, "invalid values that the line scan could not place")
    if len(frame["user_id"]) == 0:
        raise InputError(path, "the file has a header but no rows")
    return frame


def _read_parquet(path: Path, columns: list[str] | None) -> dict:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(path, f"not a readable Parquet file: {exc}") from exc
    if columns is not None:
        renames = dict(zip(table.column_names, columns, strict=False))
        table = table.rename_columns([renames.get(n, n) for n in table.column_names])
    for name in REQUIRED:
        if name not in table.column_names:
            raise InputError(path, f"missing column {name!r}; found {table.column_names!r}")
    wanted = [name for name in INTERACTION_COLUMNS if name in table.column_names]
    if table.num_rows == 0:
        raise InputError(path, "the file has no rows")
    frame = _validate(table, wanted, path=path)
    if frame is None:  # pragma: no cover - _validate raises with a row for Parquet
        raise InputError(path, "invalid values")
    return frame


def _validate(table: pa.Table, wanted: list[str], *, path: Path | None = None) -> dict | None:
    """Return numpy columns, or None when a value is invalid (the caller locates it).

    With ``path`` given (Parquet), raise an InputError naming the row instead of returning None.
    """
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        column = table.column(name)
        if name in ID_COLUMNS:
            values = _as_numpy(column, np.int64, name, path)
            if values is None:
                return None
            bad = values < 0
            reason = "negative id; ids are non-negative 64-bit integers"
        elif name == "weight":
            values = _as_numpy(column, np.float64, name, path)
            if values is None:
                return None
            bad = ~(values > 0) | ~np.isfinite(values)
            reason = "weight must be a positive number"
            values = values.astype(np.float32)
        else:
            values = _timestamps(column, path)
            if values is None:
                return None
            bad = np.zeros(len(values), dtype=bool)
            reason = ""
        if bad.any():
            if path is None:
                return None
            row = int(np.flatnonzero(bad)[0])
            raise InputError(path, reason, line=row + 1, column=name, value=column[row].as_py())
        out[name] = values
    return out


def _as_numpy(column: pa.ChunkedArray, dtype: type, name: str, path: Path | None):
    if column.null_count:
        if path is None:
            return None
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(path, "missing value", line=row + 1, column=name)
    try:
        return column.cast(pa.from_numpy_dtype(np.dtype(dtype))).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        if path is None:
            return None
        for row, value in enumerate(column.to_pylist()):
            number = parse_int(value) if dtype is np.int64 else parse_float(value)
            if number is None:
                raise InputError(
                    path,
                    f"{name} is not a number of the right kind",
                    line=row + 1,
                    column=name,
                    value=value,
                ) from None
            # A uint64 (or text) id above the int64 range fails the cast without a bad type.
            if dtype is np.int64 and number > MAX_ID:
                raise InputError(
                    path, "id does not fit in 64 bits", line=row + 1, column=name, value=value
                ) from None
        raise


def _timestamps(column: pa.ChunkedArray, path: Path | None) -> np.ndarray | None:
    if pa.types.is_integer(column.type):
        return column.to_numpy().astype(np.int64)
    if pa.types.is_timestamp(column.type):
        return column.cast(pa.timestamp("s")).cast(pa.int64()).to_numpy()
    texts = column.to_pylist()
    with warnings.catch_warnings():
        # Mixed formats are valid; they are parsed one by one below, so pandas' notice is noise.
        warnings.filterwarnings("ignore", "Could not infer format", UserWarning)
        parsed = pd.to_datetime(pd.Series(texts, dtype=object), errors="coerce", utc=True)
    if not parsed.isna().any():
        # as_unit: pandas 3 parses text to microseconds, not nanoseconds.
        return parsed.dt.as_unit("s").astype("int64").to_numpy()
    # The vectorised parse infers one format from the first value. Rows in another format,
    # or epoch seconds, are valid too: parse one by one, exactly as the line scan does.
    values = [parse_timestamp(text) for text in texts]
    if None in values:
        if path is None:
            return None
        row = values.index(None)
        raise InputError(
            path, "timestamp is not a date", line=row + 1, column="timestamp", value=texts[row]
        )
    return np.array(values, dtype=np.int64)


def _fingerprint(path: Path, columns: list[str] | None, sep: str | None, unit: str) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    digest.update(repr((columns, sep, unit)).encode())
    return "sha256:" + digest.hexdigest()
