"""`encore ingest`: what the nightly run has read from ENCORE_INTERACTIONS, and re-admitting a
partition it set aside. Also the wiring of the nightly refresh into the runs."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from encore.cli.worker_group import WorkerCommand
from encore.console import console, print_table
from encore.errors import EncoreError
from encore.settings import Settings, get_settings

if TYPE_CHECKING:
    from scheduler.job import Prepare

ingest_app = typer.Typer(
    help="The nightly ingest of ENCORE_INTERACTIONS: read now, status, re-admit.",
    no_args_is_help=True,
)


def night_preparation(settings: Settings, *, refresh: bool = True) -> Prepare | None:
    """What a full run does before scoring: with ENCORE_INTERACTIONS set, ingest what is new
    and refresh the promoted model on it; otherwise nothing."""
    if settings.interactions is None or not refresh:
        return None
    from training.freshness import refresh_for_night

    return partial(refresh_for_night, settings)


def _source(settings: Settings):
    if settings.interactions is None:
        raise typer.BadParameter("ENCORE_INTERACTIONS is not set: there is no source to read")
    return settings.interactions


@ingest_app.command("now", cls=WorkerCommand)
def ingest_now() -> None:
    """Read what is new in ENCORE_INTERACTIONS now (the nightly run does it too)."""
    from training.source import ingest

    settings = get_settings()
    result = ingest(_source(settings), settings.ingest_dir, columns=settings.interactions_columns)
    console.print(
        f"read {result.new_rows:,} new rows from {len(result.new_partitions)} partitions; "
        f"{len(result.interactions):,} rows in all"
        + (" (the state was rebuilt)" if result.rebuilt else "")
    )
    for name, error in result.set_aside.items():
        console.print(f"[red]set aside[/red] {name}: {error}", highlight=False)
    if result.set_aside:
        raise typer.Exit(1)


@ingest_app.command("status", cls=WorkerCommand)
def status() -> None:
    """The partitions read so far: admitted, or set aside and why."""
    from training.source import source_state

    settings = get_settings()
    state = source_state(settings.ingest_dir)
    if state is None:
        console.print(f"nothing ingested yet under {settings.ingest_dir}")
        return
    table = Table("partition", "status", "rows", "read at", "error")
    for name, part in state.partitions.items():
        when = datetime.fromtimestamp(part.read_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(name, part.status, f"{part.rows:,}", when, part.error or "")
    print_table(table)
    console.print(f"{state.rows:,} rows admitted from {state.source}")


@ingest_app.command("readmit", cls=WorkerCommand)
def readmit(
    partition: Annotated[str, typer.Argument(help="A partition's file name, as status lists it.")],
) -> None:
    """Read a partition that was set aside again at the next ingest (after fixing it)."""
    from training.source import readmit as forget

    settings = get_settings()
    try:
        forget(settings.ingest_dir, partition)
    except EncoreError as exc:
        raise typer.BadParameter(str(exc), param_hint="PARTITION") from exc
    console.print(f"{partition} will be read again at the next ingest")
