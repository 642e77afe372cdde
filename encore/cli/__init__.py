"""The `encore` command line: the composition root.

This package is the one place that wires the roles together (`training`, `inference`,
`scheduler`, `model_server`); the rest of `encore/` is the kernel they all import, which
imports none of them. Commands import their role's code when they run, so `--help` stays fast
and the API image (no `worker` dependency group) can still run the commands it needs.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape

from encore.cli import data, demo, experiments, ingest, models, runs, serve
from encore.cli.worker_group import WHERE, WorkerCommand, worker_module_missing
from encore.console import configure_logging, console
from encore.errors import EncoreError

app = typer.Typer(
    help="Encore: nightly batch recommendations, published and served.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# WorkerCommand: the batch side, which needs the `worker` dependency group (not in the API image).
app.command(cls=WorkerCommand)(demo.demo)
app.command(cls=WorkerCommand)(data.generate)
app.command(cls=WorkerCommand)(data.train)
app.command(cls=WorkerCommand)(data.evaluate)
app.add_typer(models.models_app, name="models")
app.add_typer(experiments.experiments_app, name="experiments")
app.command(cls=WorkerCommand)(runs.run)
app.command(cls=WorkerCommand)(runs.backfill)
app.add_typer(runs.runs_app, name="runs")
app.add_typer(ingest.ingest_app, name="ingest")
app.command()(serve.serve)
app.command(cls=WorkerCommand)(serve.scheduler)
app.add_typer(serve.db_app, name="db")
app.add_typer(serve.feedback_app, name="feedback")


def main() -> None:
    # Arrow's default allocator (mimalloc) keeps what a file read frees for reuse, and
    # release_unused() did not give it back: reading 10M users' interactions (66M rows) left
    # 4.2 GB resident through all of training. malloc returns large blocks when they are
    # freed. Set before pyarrow is first imported (the commands import it lazily), and
    # inherited by the processes the commands spawn.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    configure_logging()
    try:
        app()
    except EncoreError as exc:
        _fail(str(exc))
    except ModuleNotFoundError as exc:
        # Behind WorkerCommand: a command that reaches the batch side without being marked
        # one still ends in one line in the API image, not in a traceback.
        if not worker_module_missing(exc):
            raise
        _fail(f"{exc}, a worker package: {WHERE}")


def _fail(message: str) -> None:
    # Escaped: a bad value such as "[bold]" is data, not markup. Not wrapped: the
    # "file, line N" message must stay one line to be read, grepped and copied.
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(1)
