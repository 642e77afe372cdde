"""The ``program`` model kind: a ranker exported with torch.export (a ``.pt2`` archive).

A team that trains elsewhere hands over a program with the signature of the built-in
``Ranker.forward`` (docs/architecture.md, "The inference seam")::

    (users int64 (B,), items int64 (B, C), support float32 (B, C), neighbours int32 (B, C),
     mask bool (B, C), item_score float32 (B, C)) -> scores float32 (B, C), higher is better

A program of the first five inputs only (the signature before the item-item generator) is
accepted too, and called without ``item_score``.

torch.export.load unpickles some parts of an archive (tensor subclasses, custom objects, a
fallback for the example inputs) and loads compiled code if the archive holds any, so an
archive is vetted before it is loaded: only the program's JSON, raw tensor bytes and example
inputs that load with ``weights_only=True`` are accepted.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.utils._pytree import tree_unflatten

from encore.bundle import PROGRAM, Bundle
from encore.errors import BundleError
from inference.base import ModelVersion
from inference.candidates import CandidateArrays
from inference.ranker import padded_candidates, padded_item_scores, top_codes

DEFAULT_CANDIDATES = 75
# The program's inputs, in order: name, dtype, whether it has a candidate dimension.
INPUTS = (
    ("users", torch.int64, False),
    ("items", torch.int64, True),
    ("support", torch.float32, True),
    ("neighbours", torch.int32, True),
    ("mask", torch.bool, True),
    ("item_score", torch.float32, True),
)
# Programs exported before item_score joined the signature take the first five inputs.
LEGACY_INPUTS = 5
# What a .pt2 archive written by torch.export.save may hold, below its root directory.
# Anything else (compiled AOTInductor code, pickled legacy weights, ...) is refused by name.
ALLOWED_ENTRY = re.compile(
    r"archive_format|archive_version|byteorder|\.data/[\w.]+|extra/[^/]+|models/model\.json"
    r"|data/weights/(model_weights_config\.json|weight_\d+)"
    r"|data/constants/(model_constants_config\.json|tensor_\d+)"
    r"|data/sample_inputs/model\.pt"
)


def signature_text(candidates: int) -> str:
    inputs = ", ".join(
        f"{name} {_dtype(dtype)} {'(B, C)' if wide else '(B,)'}" for name, dtype, wide in INPUTS
    )
    return f"({inputs}) -> float32 (B, C), with B any batch size and C = {candidates}"


def read_program(source: Path, *, candidates: int) -> torch.export.ExportedProgram:
    """The exported program in ``source``, vetted, loaded and its signature checked.

    Raises BundleError, naming the file, for anything that is not a program of the contract's
    signature with ``C = candidates``.
    """
    try:
        file = open(source, "rb")  # noqa: SIM115 (one handle for the vetting and the load)
    except OSError as exc:
        raise BundleError(f"cannot read the program {source}: {exc}") from exc
    with file:
        try:
            _vet_archive(file, source)
        except (
            zipfile.BadZipFile,
            zlib.error,
            OSError,
            ValueError,
            TypeError,
            AttributeError,
        ) as exc:
            # A damaged archive or a config that is not what torch.export.save writes.
            raise BundleError(f"{source} is not a readable .pt2 archive: {exc}") from exc
        file.seek(0)
        try:
            program = torch.export.load(file)
        except Exception as exc:
            raise BundleError(f"cannot load the program {source}: {_first_line(exc)}") from exc
    check_signature(program, source, candidates=candidates)
    return program


def _vet_archive(file: IO[bytes], source: Path) -> None:
    not_a_program = f"{source} is not a torch.export program (a .pt2 from torch.export.save)"
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{not_a_program}: {exc}") from exc
    names = archive.namelist()
    root = names[0].partition("/")[0] + "/" if names else ""
    inside = {name[len(root) :]: name for name in names if name.startswith(root)}
    if len(inside) != len(names) or "archive_format" not in inside:
        if "data.pkl" in inside:
            not_a_program += " but a torch.save file (a pickle)"
        raise BundleError(not_a_program)
    if archive.read(inside["archive_format"]) != b"pt2":
        raise BundleError(f"{not_a_program}: its archive_format is not pt2")
    if "models/model.json" not in inside:
        raise BundleError(f"{source} holds no program named model (models/model.json)")
    for entry in inside:
        if not ALLOWED_ENTRY.fullmatch(entry):
            raise BundleError(
                f"{source} holds {entry!r}, which Encore does not load (it accepts the "
                "program, raw tensors and example inputs only: no pickles, no compiled code)"
            )
    for config, prefix in (
        ("weights/model_weights", "weight_"),
        ("constants/model_constants", "tensor_"),
    ):
        name = inside.get(f"data/{config}_config.json")
        entries = json.loads(archive.read(name)).get("config", {}) if name else {}
        for key, meta in entries.items():
            if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(prefix):
                raise BundleError(
                    f"{source} stores {key!r} as a pickled object, which Encore does not "
                    "load; export plain tensors (no tensor subclasses, no custom objects)"
                )
    samples = inside.get("data/sample_inputs/model.pt")
    if samples and archive.getinfo(samples).file_size:
        # torch.export.load tries weights_only first and falls back to a full unpickle: it
        # never falls back if this same load succeeds.
        try:
            torch.load(io.BytesIO(archive.read(samples)), weights_only=True)
        except Exception as exc:
            raise BundleError(
                f"{source}'s example inputs are not plain tensors; refusing to unpickle them: "
                f"{_first_line(exc)}"
            ) from exc


def check_signature(
    program: torch.export.ExportedProgram, source: Path, *, candidates: int
) -> None:
    """Raise BundleError unless ``program`` has the contract's signature (statically)."""
    expected = signature_text(candidates)
    values = {node.name: node.meta.get("val") for node in program.graph.nodes}
    inputs = [values.get(name) for name in program.graph_signature.user_inputs]
    found = ", ".join(
        _describe(name, value)
        for name, value in zip(program.graph_signature.user_inputs, inputs, strict=True)
    )
    in_spec = program.call_spec.in_spec
    args, kwargs = tree_unflatten(list(range(in_spec.num_leaves)), in_spec)
    fits = (
        not kwargs
        and len(inputs) in (LEGACY_INPUTS, len(INPUTS))
        and args == tuple(range(len(inputs)))
    )
    fits = fits and all(
        isinstance(value, torch.Tensor)
        and value.dtype == dtype
        and value.dim() == (2 if wide else 1)
        and (not wide or _is_size(value.shape[1], candidates))
        for value, (_, dtype, wide) in zip(inputs, INPUTS, strict=False)
    )
    if not fits:
        raise BundleError(f"{source} takes ({found}); a program must take {expected}")
    for name, value in zip(program.graph_signature.user_inputs, inputs, strict=True):
        bounds = _batch_bounds(program, value.shape[0])
        if bounds is not None:
            raise BundleError(
                f"{source} {bounds} for {name}; export it with dynamic_shapes "
                "torch.export.Dim('batch') (no min above 1, no max) on dimension 0 of every "
                f"input (a program must take {expected})"
            )
    outputs = program.graph_signature.user_outputs
    output_node = next(node for node in program.graph.nodes if node.op == "output")
    value = getattr(output_node.args[0][-1], "meta", {}).get("val") if outputs else None
    single = tree_unflatten([0] * len(outputs), program.call_spec.out_spec)
    if not (
        single == 0
        and isinstance(value, torch.Tensor)
        and value.dtype == torch.float32
        and value.dim() == 2
        and _is_size(value.shape[1], candidates)
    ):
        found_out = _describe("", value) if single == 0 else f"{len(outputs)} outputs"
        raise BundleError(
            f"{source} returns {found_out.strip()}; a program must take and return {expected}"
        )


def check_scores(scores: Any, source: Path | str, *, users: int, candidates: int) -> None:
    """Raise BundleError unless a program's output is float32 ``(users, candidates)``."""
    expected = f"float32 ({users}, {candidates})"
    if not isinstance(scores, torch.Tensor):
        raise BundleError(
            f"{source} returned a {type(scores).__name__} for {users} users; expected {expected}"
        )
    if scores.dtype != torch.float32 or tuple(scores.shape) != (users, candidates):
        raise BundleError(
            f"{source} returned {_dtype(scores.dtype)} {tuple(scores.shape)} for {users} users; "
            f"expected {expected}"
        )


def _is_size(size: int | torch.SymInt, expected: int) -> bool:
    # A symbolic size is compared by type first: its == would add a guard, not answer.
    return not isinstance(size, torch.SymInt) and size == expected


def _batch_bounds(program: torch.export.ExportedProgram, size: int | torch.SymInt) -> str | None:
    """What is wrong with a batch dimension that does not take every size from 1 up."""
    if not isinstance(size, torch.SymInt):
        return f"fixes the batch size at {size}"
    bounds = program.range_constraints.get(size.node.expr)
    if bounds is not None and (int(bounds.lower) > 1 or not math.isinf(float(bounds.upper))):
        return f"bounds the batch size to {bounds.lower}..{bounds.upper}"
    return None


def _describe(name: str, value: Any) -> str:
    if not isinstance(value, torch.Tensor):
        return f"{name} {type(value).__name__}"
    dims = ", ".join("B" if isinstance(size, torch.SymInt) else str(size) for size in value.shape)
    return f"{name} {_dtype(value.dtype)} ({dims}{',' if value.dim() == 1 else ''})"


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class ProgramModel(ModelVersion):
    """A bundle of an exported torch program (``program.pt2``), loaded for inference."""

    def __init__(self, bundle: Bundle, *, top_n: int) -> None:
        super().__init__(bundle, top_n=top_n)
        self.width = int(bundle.metadata["model"].get("candidates", DEFAULT_CANDIDATES))
        self.source = bundle.path / PROGRAM
        program = read_program(self.source, candidates=self.width)
        self.takes_item_score = len(program.graph_signature.user_inputs) == len(INPUTS)
        self.program = program.module()

    def rank(
        self, users: np.ndarray, candidates: CandidateArrays, rows: np.ndarray | None
    ) -> np.ndarray:
        if len(users) == 0:
            return np.full((0, self.top_n), -1, dtype=np.int64)
        at = users if rows is None else rows
        items, support, neighbours, mask = padded_candidates(
            candidates.indptr,
            candidates.items,
            candidates.support,
            candidates.neighbours,
            at,
            self.width,
        )
        inputs = [torch.from_numpy(users), items, support, neighbours, mask]
        if self.takes_item_score:
            scores = padded_item_scores(candidates.indptr, candidates.item_score, at, self.width)
            inputs.append(torch.zeros_like(support) if scores is None else scores)
        with torch.inference_mode():
            scores = self.program(*inputs)
            check_scores(scores, self.source, users=len(users), candidates=self.width)
            # Encore masks the padded slots itself: a program need not.
            scores = scores.masked_fill(~mask | scores.isnan(), -math.inf)
            return top_codes(scores, items, self.top_n)
