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

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    start: int = 0  # its first row in rows/ (rows are appended partition by partition)


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
    """Read what is new in ``source`` into the state under ``state_dir``; return every row.

    One ingest at a time per state (a lock file): the nightly run, `encore ingest now` and
    `encore train` may share a state."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with _locked(state_dir):
        return _ingest(Path(source), state_dir, columns, sep)


def _ingest(
    source: Path, state_dir: Path, columns: list[str] | None, sep: str | None
) -> IngestResult:
    found = partitions(source)
    state, rows = _load(state_dir, source)
    rebuilt = rows is None
    if rebuilt:
        gone = [n for n in state.admitted() if n not in found]
        if gone:
            # Their rows exist nowhere else: rebuilding from the source would lose them.
            raise EncoreError(
                f"the ingest state under {state_dir} has unreadable rows, and partitions "
                f"{', '.join(gone)} are no longer in {source}: restore them (or the state), or "
                "remove the state to start again from the source as it is"
            )
        state.partitions = {n: p for n, p in state.partitions.items() if p.status == SET_ASIDE}
        rows = _empty_rows()
    changed = [
        name
        for name in state.admitted()
        if name in found and _stat(found[name]) != _recorded(state.partitions[name])
    ]
    if changed:
        # A rewritten partition's old rows are dropped; it is read again below.
        logger.warning("partitions %s changed since they were read: reading them again", changed)
        keep = np.ones(len(rows[0]), dtype=bool)
        for name in changed:
            part = state.partitions.pop(name)
            keep[part.start : part.start + part.rows] = False
        rows = tuple(column[keep] for column in rows)
        _renumber(state)
    gone = [name for name in state.admitted() if name not in found]
    if gone:
        # Acknowledged rows are kept: a partition deleted from the source stays learnt from.
        logger.warning("partitions %s are no longer in %s; their rows are kept", gone, source)

    new_names, parts, aside = [], [], {}
    offset = len(rows[0])
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
            start=offset,
        )
        offset += len(data)
        parts.append((data.user_ids, data.playlist_ids, data.weights))
        new_names.append(name)

    new_rows = sum(len(p[0]) for p in parts)
    if parts:
        rows = tuple(
            np.concatenate([rows[i], *(p[i] for p in parts)]).astype(dtype, copy=False)
            for i, (_, dtype) in enumerate(COLUMNS)
        )
    state.rows = len(rows[0])
    state.fingerprint = _fingerprint(state)
    if parts or aside or rebuilt or changed:
        _save(state_dir, state, rows if (parts or rebuilt or changed) else None)
    interactions = Interactions(
        user_ids=rows[0],
        playlist_ids=rows[1],
        weights=rows[2],
        timestamps=None,
        path=source,
        fingerprint=state.fingerprint,
    )
    return IngestResult(interactions, new_names, new_rows, aside, rebuilt)


def _renumber(state: SourceState) -> None:
    """The admitted partitions' starts after some were dropped, in their rows' order."""
    offset = 0
    for name in sorted(state.admitted(), key=lambda n: state.partitions[n].start):
        state.partitions[name].start = offset
        offset += state.partitions[name].rows


def _fingerprint(state: SourceState) -> str:
    """The admitted partitions' fingerprints chained in their rows' order."""
    chained = ""
    for name in sorted(state.admitted(), key=lambda n: state.partitions[n].start):
        chained = _chain(chained, state.partitions[name].fingerprint or "")
    return chained


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    with (state_dir / ".lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def source_state(state_dir: Path) -> SourceState | None:
    """The recorded state, or None when there is none (or it cannot be read)."""
    try:
        return _read_manifest(state_dir / MANIFEST)
    except Exception:  # missing or damaged alike: nothing usable is recorded
        return None


def readmit(state_dir: Path, name: str) -> None:
    """Forget that partition ``name`` was set aside: the next ingest reads it again."""
    if not state_dir.is_dir():
        raise EncoreError(f"nothing has been ingested under {state_dir}")
    with _locked(state_dir):
        _readmit(state_dir, name)


def _readmit(state_dir: Path, name: str) -> None:
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
    its rows do not match its manifest (the state then says which partitions it had)."""
    fresh = SourceState(source=str(source))
    if not (state_dir / MANIFEST).exists():
        return fresh, None
    try:
        state = _read_manifest(state_dir / MANIFEST)
    except Exception as exc:  # any damage: the manifest is rebuilt from the source
        logger.warning("ingest manifest under %s is unreadable (%s): reading again", state_dir, exc)
        return fresh, None
    if Path(state.source).resolve() != source.resolve():
        logger.warning("ingest state is for %s, not %s: reading again", state.source, source)
        return fresh, None
    try:
        rows = tuple(
            np.load(state_dir / ROWS_DIR / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            for name, _ in COLUMNS
        )
        if any(len(column) != state.rows for column in rows) or any(
            column.dtype != dtype for column, (_, dtype) in zip(rows, COLUMNS, strict=True)
        ):
            raise ValueError(f"rows do not match the manifest's {state.rows}")
        return state, tuple(np.array(column) for column in rows)
    except Exception as exc:  # any damage to the rows: rebuilt, never fatal
        logger.warning("ingest rows under %s are unreadable (%s): reading again", state_dir, exc)
        return state, None


def _read_manifest(path: Path) -> SourceState:
    raw = json.loads(path.read_text())
    parts = {str(name): PartitionRecord(**p) for name, p in dict(raw.pop("partitions")).items()}
    return SourceState(**raw, partitions=parts)


def _save(state_dir: Path, state: SourceState, rows: tuple[np.ndarray, ...] | None) -> None:
    """Rows first (a new directory swapped in), then the manifest: a crash between the two
    leaves a manifest that does not match its rows, which the next ingest rebuilds from."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if rows is not None:
        for stale in state_dir.glob(f".{ROWS_DIR}-*"):  # a crash's leftovers (under the lock)
            shutil.rmtree(stale, ignore_errors=True)
        staging = state_dir / f".{ROWS_DIR}-{os.getpid()}"
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
    partial = state_dir / f".{MANIFEST}.{os.getpid()}.partial"
    partial.write_text(json.dumps(payload, indent=1))
    os.replace(partial, state_dir / MANIFEST)
