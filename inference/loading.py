"""Which class loads a bundle: the model kind its metadata names."""

from __future__ import annotations

import importlib
from pathlib import Path

from encore.bundle import Bundle, open_bundle
from encore.errors import BundleError
from inference.base import ModelVersion

DEFAULT_KIND = "ranker"
# Kind -> "module:class", imported only when a bundle of that kind is loaded (torch with it).
MODEL_KINDS = {
    "ranker": "inference.ranker:RankerModel",
    "program": "inference.program:ProgramModel",
}


def load_model(bundle: Bundle | Path, *, top_n: int) -> ModelVersion:
    """The bundle's model version, ready to score batches of users into top-``top_n`` lists."""
    if not isinstance(bundle, Bundle):
        bundle = open_bundle(Path(bundle).parent, Path(bundle).name)
    kind = bundle.metadata.get("model", {}).get("kind", DEFAULT_KIND)
    target = MODEL_KINDS.get(kind)
    if target is None:
        raise BundleError(
            f"bundle {bundle.version} holds a model of kind {kind!r}, which this Encore cannot "
            f"load (kinds: {', '.join(sorted(MODEL_KINDS))})"
        )
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(bundle, top_n=top_n)
