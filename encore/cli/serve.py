"""The long-running services and the stores: `encore serve`, `encore scheduler`,
`encore db upgrade`, `encore feedback export`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from encore.cli.worker_group import WorkerCommand
from encore.console import console
from encore.settings import get_settings

db_app = typer.Typer(help="The run-record and feedback database.", no_args_is_help=True)
feedback_app = typer.Typer(help="Feedback events.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the pending schema migrations."""
    from encore.database import open_database

    with open_database(get_settings()) as db:
        applied = db.upgrade()
    console.print(f"applied {', '.join(applied)}" if applied else "the schema is up to date")


@feedback_app.command("export", cls=WorkerCommand)
def feedback_export(
    since: Annotated[datetime, typer.Option(help="Events created at or after this time (UTC).")],
    out: Annotated[Path, typer.Option(help="Parquet file to write.")],
) -> None:
    """Write feedback events as Parquet, for retraining."""
    from encore.feedback_export import export_feedback

    since = since if since.tzinfo else since.replace(tzinfo=UTC)
    rows = export_feedback(get_settings(), since, out)
    console.print(f"wrote {rows:,} feedback events since {since.isoformat()} to {out}")


def scheduler() -> None:
    """Run the nightly schedule (APScheduler) and serve its metrics."""
    from encore.cli.ingest import night_preparation
    from scheduler.cron import run_scheduler

    settings = get_settings()
    run_scheduler(settings, prepare=night_preparation(settings))


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [ENCORE_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [ENCORE_PORT].")] = None,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Serve the HTTP API, the feedback page and /metrics."""
    import uvicorn

    settings = get_settings()
    uvicorn.run(
        "model_server.main:app",
        host=host or settings.host,
        port=port if port is not None else settings.port,
        workers=workers,
        log_level="info",
        access_log=False,
    )
