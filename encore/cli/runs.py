"""Runs: `encore run`, `encore backfill`, `encore runs list|show|rollback`."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from encore.cli.ingest import night_preparation
from encore.cli.worker_group import WorkerCommand
from encore.console import console, print_table, stage_progress
from encore.errors import InputError
from encore.settings import ENGINES, get_settings

runs_app = typer.Typer(help="Inspect published runs and roll back.", no_args_is_help=True)


def run(
    run_id: Annotated[
        str | None, typer.Option(help="Use a run record created by POST /v1/runs.")
    ] = None,
    kind: Annotated[str, typer.Option(help="manual, scheduled or backfill.")] = "manual",
    engine: Annotated[
        str | None,
        typer.Option(help="local (a process pool) or ray (Ray Data). Default: ENCORE_ENGINE."),
    ] = None,
    refresh: Annotated[
        bool,
        typer.Option(
            "--refresh/--no-refresh",
            help="With ENCORE_INTERACTIONS set: first ingest what is new and refresh the "
            "promoted model's pairings on it, as the nightly run does.",
        ),
    ] = True,
) -> None:
    """Score every user with the promoted model and publish the run now.

    With ENCORE_INTERACTIONS set, the run first ingests what is new there (and the feedback
    page's likes) and rebuilds the promoted model's pairings on it (see docs/operations.md).

    SIGTERM or Ctrl-C stops it before its flip: the run is recorded as failed ("stopped"),
    its keyspace is removed and the run being served stays served.
    """
    from scheduler.job import run_full
    from scheduler.stopping import stop_on_signals

    settings = get_settings()
    if engine is not None:
        if engine not in ENGINES:
            raise typer.BadParameter(
                f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}",
                param_hint="--engine",
            )
        settings = settings.model_copy(update={"engine": engine})
    with stop_on_signals(threading.Event()) as stop, stage_progress() as progress:
        record = run_full(
            settings,
            kind=kind,
            run_id=run_id,
            progress=progress,
            stop=stop,
            prepare=night_preparation(settings, refresh=refresh),
        )
    _print_run(record)


def backfill(
    users: Annotated[
        Path | None, typer.Option(help="File of user ids, one per line (or a user_id column).")
    ] = None,
    all_users: Annotated[bool, typer.Option("--all", help="A new full run of every user.")] = False,
    run_id: Annotated[str | None, typer.Option(help="Use a queued run record.")] = None,
) -> None:
    """Rescore some users into the current run, or everyone into a new run (--all)."""
    from scheduler.job import run_backfill, run_full
    from scheduler.stopping import stop_on_signals

    if users is None and not all_users:
        raise typer.BadParameter("give --users FILE or --all")
    if users is not None and all_users:
        raise typer.BadParameter("--users and --all exclude each other")
    settings = get_settings()
    ids = None if all_users else read_user_ids(users)
    options = {"run_id": run_id, "stop": threading.Event()}
    with stop_on_signals(options["stop"]), stage_progress() as progress:
        if ids is None:
            record = run_full(settings, kind="backfill", progress=progress, **options)
        else:
            record = run_backfill(settings, ids, progress=progress, **options)
    _print_run(record)


def read_user_ids(path: Path) -> list[int]:
    """User ids, one per line; a first line ``user_id`` is a header; blank lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read the file: {exc}") from exc
    ids: list[int] = []
    for number, raw in enumerate(lines, start=1):
        text = raw.strip().split(",")[0].strip()
        if not text or (number == 1 and text == "user_id"):
            continue
        if not text.isdigit():
            raise InputError(
                path,
                "not a non-negative integer user id",
                line=number,
                column="user_id",
                value=text,
            )
        ids.append(int(text))
    if not ids:
        raise InputError(path, "no user ids in the file")
    return ids


@runs_app.command("list")
def runs_list(limit: Annotated[int, typer.Option(min=1)] = 20) -> None:
    """Recent runs, newest first."""
    from encore.database import open_database
    from encore.online import open_online_store

    settings = get_settings()
    with open_database(settings) as db, open_online_store(settings) as store:
        current = store.current()
        records = db.list_runs(limit=limit)
    table = Table()
    columns = ("", "run", "kind", "status", "target", "model", "users", "cold", "seconds", "drift")
    for column in columns:
        table.add_column(column, no_wrap=True)
    for r in records:
        table.add_row(
            "*" if current and r.run_id == current.run_id else "",
            r.run_id,
            r.kind,
            r.status,
            r.target_run_id or "-",
            (r.model_version or "-")
            + (
                f" + {r.challenger_version} ({r.challenger_share:.0%})"
                if r.challenger_version
                else ""
            ),
            f"{r.users_scored:,}",
            f"{r.cold_users:,}",
            f"{r.duration_seconds:.1f}" if r.duration_seconds else "-",
            f"{r.drift_score:.4f}" if r.drift_score is not None else "-",
        )
    print_table(table)
    console.print("* marks the run being served; a backfill or rollback names its target")


@runs_app.command("show")
def runs_show(run_id: Annotated[str, typer.Argument()]) -> None:
    """One run record as JSON."""
    from encore.database import open_database
    from encore.errors import EncoreError

    with open_database(get_settings()) as db:
        record = db.get_run(run_id)
    if record is None:
        raise EncoreError(f"no run {run_id!r}")
    print(json.dumps(record.as_json(), indent=2))


@runs_app.command("rollback", cls=WorkerCommand)
def runs_rollback(run_id: Annotated[str, typer.Argument()]) -> None:
    """Serve an earlier published run again (within its grace period).

    The rollback is a run record of its own (kind rollback, pointing at RUN_ID); RUN_ID's
    times are left as they were, so the served data's age stays true.
    """
    from scheduler.job import rollback

    record = rollback(get_settings(), run_id)
    console.print(
        f"now serving run {record.target_run_id} (model {record.model_version}); "
        f"recorded as run {record.run_id}"
    )


def _print_run(record) -> None:
    cold = f"{record.cold_fraction:.2%}" if record.cold_fraction is not None else "-"
    drift = f", drift {record.drift_score:.4f}" if record.drift_score is not None else ""
    target = f" into run {record.target_run_id}" if record.target_run_id else ""
    console.print(
        f"run [bold]{record.run_id}[/] ({record.kind}) {record.status}{target}: "
        f"{record.users_scored:,} users, {record.cold_users:,} cold ({cold}), "
        f"model {record.model_version}, {record.duration_seconds or 0:.1f} s{drift}"
    )
    if record.phases:
        console.print("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in record.phases.items()))
    if record.challenger_version:
        split = ", ".join(f"{v}: {n:,}" for v, n in (record.users_by_version or {}).items())
        console.print(
            f"experiment {record.experiment_id}: challenger {record.challenger_version} for "
            f"{record.challenger_share:.0%} of users; users per version: {split}"
        )
