"""The model bundle: one directory per model version.

Layout (a contract, see docs/architecture.md)::

    bundles/<version>/
        metadata.json      version, created_at, data fingerprint, hyper-parameters, metrics
        weights.pt         torch.save of a state dict: tensors only, loaded with weights_only
                           (kind "ranker"); or program.pt2, a torch.export program (kind "program")
        user_ids.npy       sorted user ids; a user's code is its position (the id map)
        playlist_ids.npy   sorted playlist ids (the id map)
        popularity.npy     users per playlist code, for the popularity fallback
        pairings/          candidates per user code, CSR arrays (memory-mapped when read)
        catalog.parquet    optional playlist names
    bundles/PROMOTED       the version the nightly run uses

This module imports neither torch nor the training code: the API server reads metadata too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from encore.errors import BundleError
from encore.ids import IdMap

WEIGHTS = "weights.pt"
PROGRAM = "program.pt2"
METADATA = "metadata.json"
PROMOTED = "PROMOTED"
REQUIRED_FILES = (METADATA, "user_ids.npy", "playlist_ids.npy", "popularity.npy")
# The file that holds the model, by model kind; a bundle without a kind is a ranker. A kind
# not named here needs no file of its own to open (loading it names the unknown kind).
MODEL_FILES = {"ranker": WEIGHTS, "program": PROGRAM}


@dataclass(frozen=True)
class Bundle:
    path: Path
    metadata: dict[str, Any]

    @property
    def version(self) -> str:
        return self.metadata["version"]

    def user_ids(self) -> np.ndarray:
        return np.load(self.path / "user_ids.npy", mmap_mode="r")

    def playlist_ids(self) -> np.ndarray:
        return np.load(self.path / "playlist_ids.npy", mmap_mode="r")

    def user_codes(self, user_ids: np.ndarray) -> np.ndarray:
        """Codes of ``user_ids`` in this bundle's id map; -1 where a user is unknown."""
        return IdMap(np.asarray(self.user_ids())).codes(user_ids)

    def popularity(self) -> np.ndarray:
        return np.load(self.path / "popularity.npy")

    @property
    def pairings_dir(self) -> Path:
        return self.path / "pairings"

    @property
    def catalog_path(self) -> Path | None:
        path = self.path / "catalog.parquet"
        return path if path.exists() else None

    def load_state_dict(self) -> dict[str, Any]:
        """The weights as tensors, memory-mapped; refuses anything that is not a state dict."""
        import pickle

        import torch

        try:
            state = torch.load(self.path / WEIGHTS, weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            raise BundleError(
                f"{self.path / WEIGHTS} is not a plain state dict of tensors (it holds a "
                f"pickled object); refusing to load it: {str(exc).splitlines()[0]}"
            ) from exc
        except (OSError, RuntimeError) as exc:
            raise BundleError(f"cannot read {self.path / WEIGHTS}: {exc}") from exc
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise BundleError(f"{self.path / WEIGHTS} must hold a dict of tensors only")
        return state

    def update_metrics(self, metrics: dict[str, Any]) -> None:
        metadata = {**self.metadata, "metrics": {**self.metadata.get("metrics", {}), **metrics}}
        _write_json_atomic(self.path / METADATA, metadata)
        object.__setattr__(self, "metadata", metadata)


def new_version(fingerprint: str, *, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    digest = fingerprint.split(":")[-1][:8]
    return f"{now:%Y%m%dT%H%M%S%f}Z-{digest}"


def write_bundle(
    bundles_dir: Path,
    *,
    version: str,
    metadata: dict[str, Any],
    write_contents: Any,
) -> Bundle:
    """Create ``bundles_dir/version`` atomically: contents go to a temp dir that is renamed.

    ``write_contents(directory)`` writes every file but metadata.json.
    """
    bundles_dir.mkdir(parents=True, exist_ok=True)
    final = bundles_dir / version
    if final.exists():
        raise BundleError(f"bundle version {version!r} already exists at {final}")
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=bundles_dir))
    try:
        write_contents(staging)
        full = {"version": version, "created_at": datetime.now(UTC).isoformat(), **metadata}
        _write_json_atomic(staging / METADATA, full)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle(final, full)


def open_bundle(bundles_dir: Path, version: str) -> Bundle:
    path = bundles_dir / version
    if not path.is_dir():
        raise BundleError(f"no bundle version {version!r} under {bundles_dir}")
    missing = [name for name in REQUIRED_FILES if not (path / name).exists()]
    if missing:
        raise BundleError(f"bundle {path} is incomplete: missing {', '.join(missing)}")
    try:
        metadata = json.loads((path / METADATA).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {path / METADATA}: {exc}") from exc
    model_file = MODEL_FILES.get(metadata.get("model", {}).get("kind", "ranker"))
    if model_file is not None and not (path / model_file).exists():
        raise BundleError(f"bundle {path} is incomplete: missing {model_file}")
    return Bundle(path, metadata)


def list_bundles(bundles_dir: Path) -> list[Bundle]:
    """Complete bundles, oldest first (versions sort by creation time)."""
    if not bundles_dir.is_dir():
        return []
    bundles = []
    for path in sorted(bundles_dir.iterdir()):
        if path.is_dir() and not path.name.startswith(".") and (path / METADATA).exists():
            try:
                bundles.append(open_bundle(bundles_dir, path.name))
            except BundleError:
                continue
    return bundles


def promoted_version(bundles_dir: Path) -> str | None:
    try:
        return (bundles_dir / PROMOTED).read_text().strip() or None
    except FileNotFoundError:
        return None


def promote(bundles_dir: Path, version: str) -> Bundle:
    bundle = open_bundle(bundles_dir, version)
    tmp = bundles_dir / f".{PROMOTED}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, bundles_dir / PROMOTED)
    return bundle


def promoted_bundle(bundles_dir: Path) -> Bundle:
    version = promoted_version(bundles_dir)
    if version is None:
        raise BundleError(
            f"no promoted model under {bundles_dir}: run `encore train` "
            "or `encore models promote VERSION`"
        )
    return open_bundle(bundles_dir, version)


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
