"""`encore experiments report`: the verdict of the current (or the last) experiment."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from encore.console import console, print_table
from encore.settings import get_settings

experiments_app = typer.Typer(help="Judge a challenger against the champion.", no_args_is_help=True)


@experiments_app.command("report")
def experiments_report(
    experiment_id: Annotated[
        str | None, typer.Option("--experiment", help="An experiment id (default: the last).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Per version: users shown a list, views, likes, like rate with its 95 % interval; the
    difference with its interval and p-value; both versions' offline metrics."""
    from encore.database import open_database
    from encore.errors import ExperimentError
    from encore.experiment_report import report

    with open_database(get_settings()) as db:
        experiment = db.get_experiment(experiment_id) if experiment_id else db.last_experiment()
        if experiment is None:
            raise ExperimentError(
                f"no experiment {experiment_id!r}"
                if experiment_id
                else "no experiment yet: `encore models challenge VERSION --share 0.1`"
            )
        result = report(experiment, db.experiment_counts(experiment.experiment_id))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    _print(result)


def _print(result: dict[str, Any]) -> None:
    experiment = result["experiment"]
    state = f"ended ({experiment['end_reason']})" if experiment["ended_at"] else "running"
    console.print(
        f"experiment {experiment['experiment_id']}, {state}: {experiment['challenger']} "
        f"({experiment['share']:.0%} of users) against {experiment['champion']}"
    )
    table = Table()
    for column in ("version", "role", "users viewed", "views", "likes", "users liked"):
        table.add_column(column, no_wrap=True)
    for column in ("like rate", "95 % interval", "recall@10", "ndcg@10"):
        table.add_column(column, no_wrap=True, justify="right")
    for row in result["versions"]:
        table.add_row(
            row["model_version"],
            row["role"],
            f"{row['users_viewed']:,}",
            f"{row['views']:,}",
            f"{row['likes']:,}",
            f"{row['users_liked']:,}",
            _share(row["like_rate"]),
            _interval(row["like_rate_low"], row["like_rate_high"]),
            _number(row["offline"]["recall@10"]),
            _number(row["offline"]["ndcg@10"]),
        )
    print_table(table)
    difference = result["difference"]
    if difference is not None:
        console.print(
            f"challenger - champion: {difference['challenger_minus_champion']:+.2%} "
            f"(95 % interval {difference['low']:+.2%} to {difference['high']:+.2%}), "
            f"p = {difference['p_value']:.3g}"
        )
    console.print(f"verdict: {result['verdict']}")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _interval(low: float | None, high: float | None) -> str:
    return "-" if low is None or high is None else f"{low:.2%} to {high:.2%}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
