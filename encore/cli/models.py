"""`encore models`: list and import model bundles, promote the champion, start or stop a
challenger."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from encore.cli.worker_group import WorkerCommand
from encore.console import console, print_table
from encore.settings import get_settings

models_app = typer.Typer(
    help="List and import model bundles, promote the champion, start or stop a challenger.",
    no_args_is_help=True,
)


@models_app.command("list", cls=WorkerCommand)
def models_list() -> None:
    """Bundles under ENCORE_HOME, oldest first, with their aliases and offline metrics."""
    from encore.bundle import list_bundles, promoted_version
    from encore.database import open_database

    settings = get_settings()
    current = promoted_version(settings.bundles_dir)
    with open_database(settings) as db:
        experiment = db.get_experiment()
    table = Table()
    for column in ("alias", "version", "kind", "created", "users", "playlists"):
        table.add_column(column, no_wrap=True)
    for column in ("recall@10", "ndcg@10"):
        table.add_column(column, no_wrap=True, justify="right")
    for bundle in list_bundles(settings.bundles_dir):
        meta = bundle.metadata
        metrics = meta.get("metrics", {})
        alias = ""
        if bundle.version == current:
            alias = "champion"
        elif experiment is not None and bundle.version == experiment.challenger:
            alias = f"challenger {experiment.share:.0%}"
        table.add_row(
            alias,
            bundle.version,
            meta.get("model", {}).get("kind", "ranker"),
            meta.get("created_at", "")[:19],
            f"{meta['data']['users']:,}",
            f"{meta['data']['playlists']:,}",
            _metric(metrics.get("recall@10")),
            _metric(metrics.get("ndcg@10")),
        )
    print_table(table)
    if experiment is not None:
        console.print(
            f"experiment {experiment.experiment_id}: {experiment.challenger} gets "
            f"{experiment.share:.0%} of users since {experiment.started_at:%Y-%m-%d %H:%M} UTC"
        )


@models_app.command("promote", cls=WorkerCommand)
def models_promote(version: Annotated[str, typer.Argument(help="Bundle version.")]) -> None:
    """Make VERSION the champion: the model the next run scores every user with.

    A running experiment ends with it (promoting its challenger is how it is won).
    """
    from encore.bundle import open_bundle, promote, promoted_version
    from encore.database import open_database

    settings = get_settings()
    open_bundle(settings.bundles_dir, version)  # refuse an unknown version before anything
    ended = None
    if version != promoted_version(settings.bundles_dir):
        with open_database(settings) as db:
            ended = db.end_experiment(f"promoted {version}")
    bundle = promote(settings.bundles_dir, version)
    console.print(f"promoted {bundle.version}: the champion from the next run")
    if ended is not None:
        console.print(f"experiment {ended.experiment_id} ended ({ended.end_reason})")


@models_app.command("challenge", cls=WorkerCommand)
def models_challenge(
    version: Annotated[str | None, typer.Argument(help="Bundle version.")] = None,
    share: Annotated[
        float, typer.Option(min=0.001, max=0.999, help="Share of users it scores, 0 to 1.")
    ] = 0.1,
    stop: Annotated[bool, typer.Option("--stop", help="End the current experiment.")] = False,
) -> None:
    """Make VERSION the challenger for SHARE of the users from the next run, or --stop it.

    Users are assigned by a hash of (experiment id, user id): the same arm every night while
    the experiment lasts. One challenger at a time.
    """
    from datetime import UTC, datetime

    from encore.bundle import open_bundle, promoted_version
    from encore.database import open_database
    from encore.errors import ExperimentError
    from encore.experiments import Experiment, new_experiment_id

    settings = get_settings()
    if stop == (version is not None):
        raise ExperimentError("give a VERSION to challenge the champion with, or --stop")
    with open_database(settings) as db:
        if stop:
            ended = db.end_experiment("stopped")
            if ended is None:
                console.print("no experiment is running")
            else:
                console.print(f"experiment {ended.experiment_id} ended: {ended.champion} only")
            return
        champion = promoted_version(settings.bundles_dir)
        if champion is None:
            raise ExperimentError("no champion yet: `encore models promote VERSION` first")
        if version == champion:
            raise ExperimentError(f"{version} is the champion; challenge it with another version")
        bundles = [open_bundle(settings.bundles_dir, v) for v in (champion, version)]
        experiment = Experiment(
            new_experiment_id(),
            champion,
            version,
            share,
            started_at=datetime.now(UTC),
            offline={b.version: b.metadata.get("metrics", {}) for b in bundles},
        )
        db.start_experiment(experiment)
    console.print(
        f"experiment {experiment.experiment_id}: {version} challenges {champion} "
        f"for {share:.0%} of users from the next run"
    )


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
    It can then be promoted champion or made a challenger like any version.
    """
    from inference.importing import import_program

    bundle = import_program(get_settings().bundles_dir, program, like=like, version=version)
    console.print(f"imported {bundle.version}", soft_wrap=True)


def _metric(value: float | None) -> str:
    return "-" if value is None else str(value)  # as stored: rounded by the evaluation
