"""`encore models import`: a bundle of an exported torch program, made like an existing one.

The new bundle shares the other version's id maps, popularity, pairings and catalog (hard
links), so the program ranks the same candidates of the same users. Every check runs before
anything is written: a program that would fail at 2 a.m. is refused at import.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from encore.bundle import PROGRAM, Bundle, new_version, open_bundle, write_bundle
from encore.errors import BundleError
from inference.candidates import CandidateReader
from inference.program import (
    DEFAULT_CANDIDATES,
    INPUTS,
    check_scores,
    read_program,
    signature_text,
)
from inference.ranker import padded_candidates, padded_item_scores

SHARED = (
    "user_ids.npy",
    "playlist_ids.npy",
    "popularity.npy",
    "pairings",
    "seen",
    "catalog.parquet",
)
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
TRIAL_USERS = 8


def import_program(
    bundles_dir: Path, source: Path, *, like: str, version: str | None = None
) -> Bundle:
    """Write a bundle of kind ``program`` holding ``source``, with ``like``'s data.

    Raises BundleError, naming the file, for a file that is not an exported program, a
    signature other than the contract's, or scores of the wrong dtype or shape.
    """
    if version is not None and not VERSION_NAME.fullmatch(version):
        raise BundleError(
            f"version {version!r} must be letters, digits, '.', '_' or '-' (not starting "
            "with a dot or a dash)"
        )
    base = open_bundle(bundles_dir, like)
    candidates = int(base.metadata.get("model", {}).get("candidates", DEFAULT_CANDIDATES))
    program = read_program(source, candidates=candidates)
    takes_item_score = len(program.graph_signature.user_inputs) == len(INPUTS)
    _try_on_users(
        program.module(), base, source, candidates=candidates, takes_item_score=takes_item_score
    )
    source_sha256 = _sha256(source)
    version = version or new_version(f"sha256:{source_sha256}")
    if (bundles_dir / version).exists():
        raise BundleError(f"bundle version {version!r} already exists at {bundles_dir / version}")
    # Not the data fingerprint: `encore evaluate` stores the built-in ranker's figures in the
    # newest bundle trained on the same data, and this bundle holds another model.
    model = {
        "kind": "program",
        "format": "torch.export.save (.pt2): no pickles, no example inputs",
        "signature": signature_text(candidates),
        "candidates": candidates,
        "like": base.version,
        "source": str(source),
        "source_sha256": source_sha256,
        "torch": torch.__version__,
    }

    def contents(directory: Path) -> None:
        for name in SHARED:
            if (base.path / name).exists():
                _link_tree(base.path / name, directory / name)
        # The bundle's copy is written here, without the example inputs: loading it then
        # unpickles nothing at all, not even with weights_only.
        program.example_inputs = None
        torch.export.save(program, directory / PROGRAM)
        read_program(directory / PROGRAM, candidates=candidates)
        model["program_sha256"] = _sha256(directory / PROGRAM)  # written before metadata

    metadata = {"data": base.metadata.get("data", {}), "metrics": {}, "model": model}
    return write_bundle(bundles_dir, version=version, metadata=metadata, write_contents=contents)


def _try_on_users(
    module: torch.nn.Module,
    base: Bundle,
    source: Path,
    *,
    candidates: int,
    takes_item_score: bool,
) -> None:
    """Run the program on real users of ``base``: a batch, then one of another size."""
    pairs = CandidateReader(base.pairings_dir).every_user
    warm = np.flatnonzero(np.diff(pairs.indptr) > 0)
    if len(warm) == 0:
        raise BundleError(f"bundle {base.version} has no user with candidates to try {source} on")
    for users in (warm[:TRIAL_USERS], warm[-1:]):
        users = users.astype(np.int64)
        items, support, neighbours, mask = padded_candidates(
            pairs.indptr, pairs.items, pairs.support, pairs.neighbours, users, candidates
        )
        inputs = [torch.from_numpy(users), items, support, neighbours, mask]
        if takes_item_score:
            scores = padded_item_scores(pairs.indptr, pairs.item_score, users, candidates)
            inputs.append(torch.zeros_like(support) if scores is None else scores)
        try:
            with torch.inference_mode():
                scores = module(*inputs)
        except Exception as exc:
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BundleError(
                f"{source} failed on a batch of {len(users)} users of bundle {base.version}: "
                f"{message}"
            ) from exc
        check_scores(scores, source, users=len(users), candidates=candidates)
        bad = int((~torch.isfinite(scores[mask])).sum())
        if bad:
            raise BundleError(
                f"{source} returned {bad} scores that are NaN or infinite in slots that hold a "
                f"candidate (a batch of {len(users)} users of bundle {base.version}); scores "
                "must be finite where mask is true"
            )


def _link_tree(source: Path, target: Path) -> None:
    if source.is_dir():
        target.mkdir()
        for child in source.iterdir():
            _link_tree(child, target / child.name)
        return
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(source, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
