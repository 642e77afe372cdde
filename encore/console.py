"""Terminal output for the CLI: rich progress bars fed by callbacks, and logging."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.segment import Segments
from rich.table import Table

from encore.redact import install_log_redaction

console = Console(stderr=True)


def configure_logging(level: int = logging.INFO) -> None:
    """Log to the terminal, with credentials masked (:mod:`encore.redact`) on every handler."""
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("encore").setLevel(level)
    install_log_redaction()


class StageProgress:
    """A callback ``(stage, done, total, **fields)`` that drives one bar per stage."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, stage: str, done: int, total: int, **fields: Any) -> None:
        info = "  ".join(
            f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
            for key, value in fields.items()
        )
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total, info=info)
        self._progress.update(self._tasks[stage], completed=done, total=total, info=info)


@contextmanager
def stage_progress() -> Iterator[StageProgress]:
    with Progress(
        TextColumn("[bold]{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    ) as progress:
        yield StageProgress(progress)


def print_table(table: Table) -> None:
    """Lay a table out at its natural width, never squeezed to the console.

    Squeezed to 80 columns (the width when piped), ids that other commands need (a model
    version, a run id) were cropped and narrow marker columns dropped.
    """
    natural = console.measure(table, options=console.options.update_width(1000)).maximum
    options = console.options.update_width(max(console.width, natural))
    console.print(Segments(console.render(table, options)), crop=False)
