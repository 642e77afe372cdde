"""A growing interactions source (``ENCORE_INTERACTIONS``): one file, or a directory of
partitions (for example one file per day), read night after night.

What has been read is kept under ``state_dir`` (``ENCORE_HOME/state/ingest``)::

    ingest.json        the partitions seen: size, mtime, rows, admitted or set aside (and why)
    rows/              every admitted row so far, validated: user_ids.npy, playlist_ids.npy,
                       weights.npy (in the order the partitions were read)

A night reads only the partitions that are new (or changed) since the state was written. A bad
partition is set aside with the error that names its file, line and column, and the night goes
on with the rest; it is read again once it changes on disk or an operator re-admits it. A state
that is missing or does not match its own manifest is rebuilt from every partition, which costs
time, never a failed night.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from encore.errors import EncoreError, InputError
from training.ingest import PARQUET_SUFFIXES, TAB_SUFFIXES, Interactions, read_interactions

logger = logging.getLogger("encore.ingest.source")

PARTITION_SUFFIXES = PARQUET_SUFFIXES | TAB_SUFFIXES | {".csv", ".txt"}
MANIFEST = "ingest.json"
ROWS_DIR = "rows"
COLUMNS = (("user_ids", np.int64), ("playlist_ids", np.int64), ("weights", np.float32))
ADMITTED, SET_ASIDE = "admitted", "set_aside"


@dataclass
class PartitionRecord:
    size: int
    mtime_ns: int
    status: str  # admitted | set_aside
    rows: int = 0
    error: str | None = None
    fingerprint: str | None = None
    read_at: float = 0.0


@dataclass
class SourceState:
    source: str
    # Chained over the admitted partitions in reading order; a source of one partition has
    # that file's fingerprint, as a model trained on the file directly does.
    fingerprint: str = ""
    rows: int = 0
    partitions: dict[str, PartitionRecord] = field(default_factory=dict)

    def admitted(self) -> list[str]:
        return [name for name, p in self.partitions.items() if p.status == ADMITTED]

    def set_aside(self) -> dict[str, str]:
        return {n: p.error or "" for n, p in self.partitions.items() if p.status == SET_ASIDE}


@dataclass(frozen=True)
class IngestResult:
    """What one ingest read, and every admitted row so far."""

    interactions: Interactions
    new_partitions: list[str]
    new_rows: int
    set_aside: dict[str, str]  # partitions set aside by this ingest: name -> error
    rebuilt: bool  # the state was missing, stale or corrupt: every partition was read again


def partitions(source: Path) -> dict[str, Path]:
    """The partitions of ``source`` by name, in name order: the file itself, or the directory's
    data files (dot files and unknown suffixes are not partitions)."""
    if source.is_file():
        return {source.name: source}
    if not source.is_dir():
        raise EncoreError(f"ENCORE_INTERACTIONS={str(source)!r} is neither a file nor a directory")
    found = {
        path.name: path
        for path in source.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() in PARTITION_SUFFIXES
    }
    return dict(sorted(found.items()))


def ingest(
    source: Path,
    state_dir: Path,
    *,
    columns: list[str] | None = None,
    sep: str | None = None,
) -> IngestResult:
    """Read what is new in ``source`` into the state under ``state_dir``; return every row."""
    source = Path(source)
    found = partitions(source)
    state, rows = _load(state_dir, source)
    rebuilt = rows is None
    changed = [
        name
        for name in state.admitted()
        if name in found and _stat(found[name]) != _recorded(state.partitions[name])
    ]
    if changed:
        # An admitted partition was rewritten: its old rows cannot be told apart from the rest.
        logger.warning("partition %s changed since it was read: reading every one again", changed)
        rebuilt = True
    if rebuilt:
        set_aside_before = {
            n: p for n, p in state.partitions.items() if p.status == SET_ASIDE and n in found
        }
        state, rows = SourceState(source=str(source), partitions=set_aside_before), _empty_rows()
    gone = [name for name in state.admitted() if name not in found]
    if gone:
        # Acknowledged rows are kept: a partition deleted from the source stays learnt from.
        logger.warning("partitions %s are no longer in %s; their rows are kept", gone, source)

    new_names, parts, aside = [], [], {}
    for name, path in found.items():
        known = state.partitions.get(name)
        if known is not None and _stat(path) == _recorded(known):
            continue  # admitted already, or set aside and unchanged
        size, mtime_ns = _stat(path)
        try:
            data = read_interactions(path, columns=columns, sep=sep)
        except InputError as exc:
            state.partitions[name] = PartitionRecord(
                size, mtime_ns, SET_ASIDE, error=str(exc), read_at=time.time()
            )
            aside[name] = str(exc)
            logger.error("partition set aside: %s", exc)
            continue
        state.partitions[name] = PartitionRecord(
            size,
            mtime_ns,
            ADMITTED,
            rows=len(data),
            fingerprint=data.fingerprint,
            read_at=time.time(),
        )
        state.fingerprint = _chain(state.fingerprint, data.fingerprint)
        parts.append((data.user_ids, data.playlist_ids, data.weights))
        new_names.append(name)

    new_rows = sum(len(p[0]) for p in parts)
    if parts:
        rows = tuple(
            np.concatenate([rows[i], *(p[i] for p in parts)]).astype(dtype, copy=False)
            for i, (_, dtype) in enumerate(COLUMNS)
        )
    state.rows = len(rows[0])
    if parts or aside or rebuilt:
        _save(state_dir, state, rows if (parts or rebuilt) else None)
    interactions = Interactions(
        user_ids=rows[0],
        playlist_ids=rows[1],
        weights=rows[2],
        timestamps=None,
        path=source,
        fingerprint=state.fingerprint,
    )
    return IngestResult(interactions, new_names, new_rows, aside, rebuilt)


def source_state(state_dir: Path) -> SourceState | None:
    """The recorded state, or None when there is none (or it cannot be read)."""
    try:
        return _read_manifest(state_dir / MANIFEST)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def readmit(state_dir: Path, name: str) -> None:
    """Forget that partition ``name`` was set aside: the next ingest reads it again."""
    state = source_state(state_dir)
    record = state.partitions.get(name) if state else None
    if record is None or record.status != SET_ASIDE:
        aside = sorted(state.set_aside()) if state else []
        raise EncoreError(
            f"partition {name!r} is not set aside (set aside: {', '.join(aside) or 'none'})"
        )
    del state.partitions[name]
    _write_manifest(state_dir, state)


def with_likes(
    interactions: Interactions, user_ids: np.ndarray, playlist_ids: np.ndarray, weight: float
) -> Interactions:
    """``interactions`` and the feedback page's likes as rows of ``weight`` (none when 0)."""
    if weight <= 0 or len(user_ids) == 0:
        return interactions
    digest = hashlib.sha256(interactions.fingerprint.encode())
    digest.update(np.asarray(user_ids, dtype=np.int64).tobytes())
    digest.update(np.asarray(playlist_ids, dtype=np.int64).tobytes())
    digest.update(repr(weight).encode())
    return Interactions(
        user_ids=np.concatenate([interactions.user_ids, user_ids]).astype(np.int64),
        playlist_ids=np.concatenate([interactions.playlist_ids, playlist_ids]).astype(np.int64),
        weights=np.concatenate(
            [interactions.weights, np.full(len(user_ids), weight, dtype=np.float32)]
        ),
        timestamps=None,
        path=interactions.path,
        fingerprint="sha256:" + digest.hexdigest(),
    )


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _recorded(record: PartitionRecord) -> tuple[int, int]:
    return record.size, record.mtime_ns


def _chain(before: str, fingerprint: str) -> str:
    if not before:
        return fingerprint
    return "sha256:" + hashlib.sha256(f"{before}|{fingerprint}".encode()).hexdigest()


def _empty_rows() -> tuple[np.ndarray, ...]:
    return tuple(np.zeros(0, dtype=dtype) for _, dtype in COLUMNS)


def _load(state_dir: Path, source: Path) -> tuple[SourceState, tuple[np.ndarray, ...] | None]:
    """The state and its rows; rows None when the state is missing, for another source, or
    does not match its manifest (rebuilt from every partition)."""
    fresh = SourceState(source=str(source))
    if not (state_dir / MANIFEST).exists():
        return fresh, None
    try:
        state = _read_manifest(state_dir / MANIFEST)
        if state.source != str(source):
            logger.warning("ingest state is for %s, not %s: reading again", state.source, source)
            return fresh, None
        rows = tuple(
            np.load(state_dir / ROWS_DIR / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            for name, _ in COLUMNS
        )
        if any(len(column) != state.rows for column in rows) or any(
            column.dtype != dtype for column, (_, dtype) in zip(rows, COLUMNS, strict=True)
        ):
            raise ValueError(f"rows do not match the manifest's {state.rows}")
        return state, tuple(np.array(column) for column in rows)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ingest state under %s is unreadable (%s): reading again", state_dir, exc)
        return fresh, None


def _read_manifest(path: Path) -> SourceState:
    raw = json.loads(path.read_text())
    parts = {name: PartitionRecord(**p) for name, p in raw.pop("partitions").items()}
    return SourceState(**raw, partitions=parts)


def _save(state_dir: Path, state: SourceState, rows: tuple[np.ndarray, ...] | None) -> None:
    """Rows first (a new directory swapped in), then the manifest: a crash between the two
    leaves a manifest that does not match its rows, which the next ingest rebuilds from."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if rows is not None:
        staging = state_dir / f".{ROWS_DIR}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for (name, _), column in zip(COLUMNS, rows, strict=True):
            np.save(staging / f"{name}.npy", column)
        old = state_dir / f".{ROWS_DIR}-old-{os.getpid()}"
        if (state_dir / ROWS_DIR).exists():
            os.replace(state_dir / ROWS_DIR, old)
        os.replace(staging, state_dir / ROWS_DIR)
        shutil.rmtree(old, ignore_errors=True)
    _write_manifest(state_dir, state)


def _write_manifest(state_dir: Path, state: SourceState) -> None:
    payload = asdict(state)
    partial = state_dir / f".{MANIFEST}.partial"
    partial.write_text(json.dumps(payload, indent=1))
    os.replace(partial, state_dir / MANIFEST)
