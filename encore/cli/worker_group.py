"""Commands that need the `worker` dependency group, and a one-line error where it is missing.

The API image installs the project without that group (pyproject.toml): it serves, upgrades
the schema and lists runs, but cannot train, score or schedule. Such a command run there stops
before it starts, naming what is missing and where to run it, instead of an ImportError
traceback from deep inside the role it imports.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import typer
from typer.core import TyperCommand

from encore.errors import EncoreError

# Import name -> distribution, for every package of the `worker` group in pyproject.toml
# (tests/test_api_install.py keeps the two equal).
WORKER_MODULES = {
    "apscheduler": "apscheduler",
    "faiss": "faiss-cpu",
    "matplotlib": "matplotlib",
    "numpy": "numpy",
    "pandas": "pandas",
    "pyarrow": "pyarrow",
    "scipy": "scipy",
    "torch": "torch",
}

WHERE = (
    "run it in the worker image (`docker compose run --rm scheduler encore ...`) "
    "or install them with `uv sync --group worker`"
)


class MissingWorkerPackages(EncoreError):
    """A batch command in an install without the `worker` dependency group."""

    def __init__(self, command: str, missing: list[str]) -> None:
        self.command, self.missing = command, missing
        super().__init__(
            f"`{command}` needs the worker packages (missing: {', '.join(missing)}): {WHERE}"
        )


def missing_worker_packages() -> list[str]:
    """Distributions of the worker group whose module cannot be found; nothing is imported."""
    missing = []
    for module, distribution in WORKER_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(distribution)
    return missing


def require_worker_packages(command: str) -> None:
    if missing := missing_worker_packages():
        raise MissingWorkerPackages(command, missing)


def worker_module_missing(exc: ModuleNotFoundError) -> bool:
    """Whether an import failed because a package of the worker group is not installed."""
    return (exc.name or "").partition(".")[0] in WORKER_MODULES


class WorkerCommand(TyperCommand):
    """A command that checks for the worker packages once its arguments are parsed.

    After parsing, so that `--help` and usage errors work in the API image too; before the
    callback, so that nothing has been read or written when it stops.
    """

    def invoke(self, ctx: typer.Context) -> Any:
        require_worker_packages(ctx.command_path)
        return super().invoke(ctx)
