"""`encore models`: list, promote and import model bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from encore.cli.worker_group import WorkerCommand
from encore.console import console, print_table
from encore.settings import get_settings

models_app = typer.Typer(help="List, promote and import model bundles.", no_args_is_help=True)


@models_app.command("list", cls=WorkerCommand)
def models_list() -> None:
    """Bundles under ENCORE_HOME, oldest first; * marks the promoted one."""
    from encore.bundle import list_bundles, promoted_version

    bundles_dir = get_settings().bundles_dir
    current = promoted_version(bundles_dir)
    table = Table()
    for column in ("", "version", "created", "users", "playlists", "recall@10", "ndcg@10"):
        table.add_column(column, no_wrap=True)
    for bundle in list_bundles(bundles_dir):
        meta = bundle.metadata
        metrics = meta.get("metrics", {})
        table.add_row(
            "*" if bundle.version == current else "",
            bundle.version,
            meta.get("created_at", "")[:19],
            f"{meta['data']['users']:,}",
            f"{meta['data']['playlists']:,}",
            str(metrics.get("recall@10", "-")),
            str(metrics.get("ndcg@10", "-")),
        )
    print_table(table)


@models_app.command("promote", cls=WorkerCommand)
def models_promote(version: Annotated[str, typer.Argument(help="Bundle version.")]) -> None:
    """Make VERSION the model the next run uses."""
    from encore.bundle import promote

    bundle = promote(get_settings().bundles_dir, version)
    console.print(f"promoted {bundle.version}")


@models_app.command("import", cls=WorkerCommand)
def models_import(
    program: Annotated[
        Path, typer.Option("--program", help="A torch.export program (.pt2, torch.export.save).")
    ],
    like: Annotated[
        str,
        typer.Option("--like", help="The bundle whose users, playlists and candidates it uses."),
    ],
    version: Annotated[
        str | None, typer.Option("--version", help="The new bundle's version (default: dated).")
    ] = None,
) -> None:
    """Make a bundle of an exported program with the signature of the built-in ranker.

    The program is loaded and run on users of LIKE first; nothing is written if it fails.
    """
    from inference.importing import import_program

    bundle = import_program(get_settings().bundles_dir, program, like=like, version=version)
    console.print(f"imported {bundle.version}", soft_wrap=True)
