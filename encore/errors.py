"""Errors a user can act on. Messages name the file, key or value that was wrong."""

from __future__ import annotations

from pathlib import Path


class EncoreError(Exception):
    """Base of every error Encore reports to a user without a traceback."""


class InputError(EncoreError):
    """A bad input file: names file, line, column and value where they are known."""

    def __init__(
        self,
        path: str | Path,
        reason: str,
        *,
        line: int | None = None,
        column: str | None = None,
        value: object = None,
    ) -> None:
        self.path, self.reason, self.line, self.column, self.value = (
            str(path),
            reason,
            line,
            column,
            value,
        )
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column!r}"
        detail = f" (value {value!r})" if value is not None else ""
        super().__init__(f"{where}: {reason}{detail}")


class BundleError(EncoreError):
    """A model bundle that is missing, incomplete or unsafe to load."""


class StoreUnavailable(EncoreError):
    """A store (Redis, Postgres, SQLite) could not be reached."""


class NoPublishedRun(EncoreError):
    """No run has been published yet."""


class RunLocked(EncoreError):
    """Another run holds the run lock."""


class RunFailed(EncoreError):
    """A run stopped before publishing; nothing it wrote is visible."""


class RunStopped(RunFailed):
    """A run stopped on request (SIGTERM or SIGINT) before its flip; the previous run stays."""
