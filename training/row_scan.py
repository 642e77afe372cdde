"""The slow path of ingest: a bad file walked line by line with the ``csv`` module, to name
the first bad row's file, line, column and value; and the parsers both paths share."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from encore.errors import InputError

INTERACTION_COLUMNS = ("user_id", "playlist_id", "weight", "timestamp")
ID_COLUMNS = ("user_id", "playlist_id")
MAX_ID = np.iinfo(np.int64).max


def parse_timestamp(text: object) -> int | None:
    """Epoch seconds of an integer or of a date in any format pandas reads; else None."""
    number = parse_int(text)
    if number is not None:
        return number
    stamp = pd.to_datetime(str(text), errors="coerce", utc=True)
    return None if pd.isna(stamp) else stamp.value // 10**9  # .value is in nanoseconds


def parse_int(text: object) -> int | None:
    if isinstance(text, int):
        return text
    try:
        return int(str(text).strip())
    except ValueError:
        return None


def parse_float(text: object) -> float | None:
    try:
        return float(str(text).strip())
    except ValueError:
        return None


def scan_for_error(path: Path, delimiter: str, names: list[str], has_header: bool) -> None:
    """Walk the file row by row and raise an InputError at the first bad row."""
    for line, fields in _rows(path, delimiter, skip_header=has_header):
        if not any(field.strip() for field in fields):
            continue
        if len(fields) != len(names):
            raise InputError(
                path,
                f"expected {len(names)} fields, found {len(fields)}",
                line=line,
                value=delimiter.join(fields),
            )
        for name, field in zip(names, fields, strict=True):
            _check_field(path, line, name, field)


def _check_field(path: Path, line: int, name: str, field: str) -> None:
    if name in INTERACTION_COLUMNS and not _is_utf8(field):
        raise InputError(
            path,
            "the value is not UTF-8 text",
            line=line,
            column=name,
            value=field.encode("utf-8", "surrogateescape"),
        )
    if name in ID_COLUMNS:
        value = parse_int(field)
        if value is None:
            raise InputError(path, "not an integer id", line=line, column=name, value=field)
        if value < 0:
            raise InputError(
                path,
                "negative id; ids are non-negative 64-bit integers",
                line=line,
                column=name,
                value=field,
            )
        if value > MAX_ID:
            raise InputError(
                path, "id does not fit in 64 bits", line=line, column=name, value=field
            )
    elif name == "weight":
        value = parse_float(field)
        if value is None:
            raise InputError(path, "weight is not a number", line=line, column=name, value=field)
        if not value > 0 or value == float("inf"):
            raise InputError(
                path, "weight must be a positive number", line=line, column=name, value=field
            )
    elif name == "timestamp" and parse_timestamp(field) is None:
        raise InputError(path, "timestamp is not a date", line=line, column=name, value=field)


def _rows(path: Path, delimiter: str, *, skip_header: bool) -> Iterator[tuple[int, list[str]]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and skip_header:
                continue
            # Undecodable bytes survive as surrogates, so the check can name their column.
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8", "surrogateescape")
            yield number, next(csv.reader([text.rstrip("\r\n")], delimiter=delimiter), [])


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
