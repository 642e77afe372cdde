"""`encore models`: list and promote model bundles."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from encore.cli.worker_group import WorkerCommand
from encore.console import console, print_table
from encore.settings import get_settings

models_app = typer.Typer(help="List and promote model bundles.", no_args_is_help=True)


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
