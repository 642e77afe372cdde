"""Errors a user can act on. Messages name the file, key or value that was wrong."""

from __future__ import annotations

from pathlib import Path

from encore.redact import redact


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


# What StoreUnavailable.component names.
ONLINE_STORE = "online_store"
DATABASE = "database"


class StoreUnavailable(EncoreError):
    """A store (Redis, Postgres, SQLite) could not be reached, or refused to work.

    ``component`` names the part of the system that is down, as the API reports it:
    ``"online_store"`` (the published lists) or ``"database"`` (run records and feedback).
    The message is redacted here, whoever raises it: it often quotes the store's URL.
    """

    def __init__(self, message: str, *, component: str | None = None) -> None:
        super().__init__(redact(message))
        self.component = component


class NoPublishedRun(EncoreError):
    """No run has been published yet."""


class RunLocked(EncoreError):
    """Another run holds the run lock."""


class RunFailed(EncoreError):
    """A run stopped before publishing; nothing it wrote is visible."""


class RunStopped(RunFailed):
    """A run stopped on request (SIGTERM or SIGINT) before its flip; the previous run stays."""


class ExperimentError(EncoreError):
    """An experiment that cannot be started, stopped or reported as asked."""
