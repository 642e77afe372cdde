"""Export a bundle's built-in ranker as a torch.export program, ready for `encore models import`.

    uv run python docs/examples/export_ranker.py [VERSION] [--out ranker.pt2]

VERSION defaults to the promoted bundle under ENCORE_HOME. The ranker exports as it is: its
``forward`` has the program signature, and its bfloat16 embedding tables become the program's
weights (the file holds them all: about 256 MB per million users at 128 dimensions).

A team's own model exports the same way: any ``nn.Module`` whose ``forward(users, items,
support, neighbours, mask, item_score)`` takes int64 (B,), int64 (B, C), float32 (B, C), int32
(B, C), bool (B, C) and float32 (B, C) tensors and returns float32 (B, C) scores, with C the
candidates of the bundle it is imported like (``model.candidates`` in its metadata.json).
``item_score`` is the item-item generator's score of each candidate (0 when the bundle has
none); a program may also take only the first five inputs. Export it with
``example_inputs(...)`` below and the same ``dynamic_shapes``: the batch size must be dynamic.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from encore.bundle import open_bundle, promoted_bundle
from encore.settings import get_settings
from inference.ranker import load_ranker


def example_inputs(batch: int, candidates: int) -> tuple[torch.Tensor, ...]:
    """Inputs of the program signature; the values do not matter, the dtypes and shapes do."""
    return (
        torch.arange(batch, dtype=torch.int64),  # users: codes in the bundle's id map
        torch.zeros(batch, candidates, dtype=torch.int64),  # items: playlist codes, -1 padded
        torch.zeros(batch, candidates, dtype=torch.float32),  # support
        torch.zeros(batch, candidates, dtype=torch.int32),  # neighbours
        torch.ones(batch, candidates, dtype=torch.bool),  # mask: true where a slot is real
        torch.zeros(batch, candidates, dtype=torch.float32),  # item_score
    )


def export(model: torch.nn.Module, candidates: int) -> torch.export.ExportedProgram:
    """``model`` as a program of the signature, with a dynamic batch dimension."""
    batch = torch.export.Dim("batch")
    # Dimension 0 of all six inputs is the same batch size; C stays fixed.
    dynamic_shapes = tuple({0: batch} for _ in range(6))
    with torch.no_grad():
        return torch.export.export(
            model.eval(), example_inputs(4, candidates), dynamic_shapes=dynamic_shapes
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", nargs="?", help="bundle version (default: the promoted one)")
    parser.add_argument("--out", type=Path, default=Path("ranker.pt2"))
    args = parser.parse_args()
    bundles_dir = get_settings().bundles_dir
    bundle = (
        open_bundle(bundles_dir, args.version) if args.version else promoted_bundle(bundles_dir)
    )
    ranker = load_ranker(bundle)
    torch.export.save(export(ranker, ranker.candidates), args.out)
    print(f"wrote {args.out}; import it with:")
    print(f"  encore models import --program {args.out} --like {bundle.version}")


if __name__ == "__main__":
    main()
