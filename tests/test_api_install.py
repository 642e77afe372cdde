"""The API image's install: the project without its `worker` dependency group.

The API image (Dockerfile, target api) has none of torch, faiss, scipy, numpy, pandas, pyarrow
or apscheduler. Each test here runs a fresh interpreter in which importing any of them fails,
as it does there: the API's commands and the app must work, and every batch command must stop
with one line that says where to run it, not with a traceback.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from encore.cli.worker_group import WORKER_MODULES

ROOT = Path(__file__).resolve().parents[1]

# Runs in the fresh interpreter: argv[1] is the JSON list of blocked top-level modules, then a
# mode. A finder ahead of every other one raises ModuleNotFoundError for them, as Python does
# for a package that is not installed.
BLOCKED_INTERPRETER = r"""
import contextlib, importlib.abc, io, json, sys

BLOCKED = frozenset(json.loads(sys.argv[1]))
early = sorted(name for name in sys.modules if name.partition(".")[0] in BLOCKED)
assert not early, f"imported before the finder was installed: {early}"


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
mode, args = sys.argv[2], sys.argv[3:]

if mode == "cli":
    sys.argv = ["encore", *args]
    from encore.cli import main

    main()
elif mode == "each":
    # Many command lines in this one interpreter: each one's exit code and its output.
    from encore.cli import main

    results = []
    for argv in json.loads(args[0]):
        sys.argv = ["encore", *argv]
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code
        results.append({"argv": argv, "code": code, "out": out.getvalue(), "err": err.getvalue()})
    print(json.dumps(results))
elif mode == "probe":
    # A batch command someone forgot to mark as a WorkerCommand.
    from encore import cli

    @cli.app.command("probe")
    def probe() -> None:
        import torch  # noqa: F401

    sys.argv = ["encore", "probe"]
    cli.main()
elif mode == "app":
    import model_server.main
    from fastapi.testclient import TestClient

    with TestClient(model_server.main.app) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/").status_code == 200
        assert client.get("/metrics").status_code == 200
        # No run published in this empty ENCORE_HOME: an answer, not a crash.
        assert client.get("/readyz").status_code == 503
        assert client.post("/v1/recommendations", json={"user_ids": [1]}).status_code == 503
        assert client.get("/v1/runs").status_code == 200
    print("app ok")
"""

# Every batch command, with the arguments it needs to get past parsing.
WORKER_COMMANDS = {
    "generate": ["--users", "10", "--playlists", "10", "--out", "generated"],
    "train": ["--interactions", "plays.csv"],
    "evaluate": ["--interactions", "plays.csv"],
    "models list": [],
    "models promote": ["v1"],
    "models challenge": ["v2", "--share", "0.1"],
    "models import": ["--program", "ranker.pt2", "--like", "v1"],
    "run": [],
    "backfill": ["--all"],
    "runs rollback": ["some-run"],
    "scheduler": [],
    "demo": ["--no-serve"],
    "feedback export": ["--since", "2026-11-01", "--out", "feedback.parquet"],
    "ingest now": [],
    "ingest status": [],
    "ingest readmit": ["day-1.csv"],
}
ONE_LINE = re.compile(
    r"error: `encore (?P<command>[a-z ]+)` needs the worker packages"
    r" \(missing: (?P<missing>[^)]+)\): run it in the worker image .*`uv sync --group worker`"
)


def _blocked(mode: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCKED_INTERPRETER,
            json.dumps(sorted(WORKER_MODULES)),
            mode,
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _group(name: str) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    requirements = project["dependency-groups"][name]
    return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_worker_modules_are_the_worker_group() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert set(WORKER_MODULES.values()) == _group("worker")
    # `uv sync` and `uv run` install it: a fresh clone's `uv run encore demo` has everything.
    assert {"dev", "worker"} <= set(project["tool"]["uv"]["default-groups"])
    # Not a dependency of the project too: then the API image would have it after all.
    core = {
        re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower()
        for r in project["project"]["dependencies"]
    }
    assert not core & _group("worker"), core & _group("worker")
    # Each import name really is that distribution's (faiss is faiss-cpu's, for one).
    providers = importlib.metadata.packages_distributions()
    for module, distribution in WORKER_MODULES.items():
        assert distribution in {d.lower() for d in providers.get(module, [])}, module


def test_the_api_commands_work_without_the_worker_packages(tmp_path: Path) -> None:
    for argv in (["db", "upgrade", "--help"], ["serve", "--help"]):
        result = _blocked("cli", *argv, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert f"Usage: encore {' '.join(argv[:-1])}" in result.stdout, result.stdout
    # And for real (SQLite under this test's ENCORE_HOME): migrate's command, then an admin one.
    upgrade = _blocked("cli", "db", "upgrade", cwd=tmp_path)
    assert upgrade.returncode == 0, upgrade.stderr
    assert "applied" in upgrade.stderr or "up to date" in upgrade.stderr, upgrade.stderr
    listed = _blocked("cli", "runs", "list", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "marks the run being served" in listed.stderr
    shown = _blocked("cli", "runs", "show", "no-such-run", cwd=tmp_path)
    assert (shown.returncode, shown.stderr.strip()) == (1, "error: no run 'no-such-run'")
    # The experiment's report reads the database only: no scipy, no numpy.
    report = _blocked("cli", "experiments", "report", cwd=tmp_path)
    assert report.returncode == 1 and "no experiment yet" in report.stderr, report.stderr


def test_the_app_starts_and_answers_without_the_worker_packages(tmp_path: Path) -> None:
    result = _blocked("app", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("app ok")


def test_encore_run_stops_with_one_line_and_exit_code_1(tmp_path: Path) -> None:
    result = _blocked("cli", "run", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    match = ONE_LINE.fullmatch(lines[0])
    assert match, lines[0]
    assert match["command"] == "run"
    assert match["missing"].split(", ") == sorted(WORKER_MODULES.values())
    # It stopped before it started: no run record, no store.
    assert not (tmp_path / "home").exists()


def test_every_batch_command_stops_before_it_starts(tmp_path: Path) -> None:
    (tmp_path / "plays.csv").write_text("user_id,playlist_id\n1,2\n", encoding="utf-8")
    lines = [[*command.split(), *args] for command, args in WORKER_COMMANDS.items()]
    result = _blocked("each", json.dumps(lines), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout)
    for command, outcome in zip(WORKER_COMMANDS, outcomes, strict=True):
        printed = outcome["err"].strip().splitlines()
        assert outcome["code"] == 1, outcome
        assert len(printed) == 1, outcome
        match = ONE_LINE.fullmatch(printed[0])
        assert match and match["command"] == command, outcome
    assert not (tmp_path / "generated").exists() and not (tmp_path / "feedback.parquet").exists()
    assert not (tmp_path / "home").exists(), "a batch command wrote to ENCORE_HOME"
    # Checked after parsing: their help still works where they cannot run.
    helps = [[*command.split(), "--help"] for command in WORKER_COMMANDS]
    result = _blocked("each", json.dumps(helps), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command, outcome in zip(WORKER_COMMANDS, json.loads(result.stdout), strict=True):
        assert outcome["code"] == 0, outcome
        assert f"Usage: encore {command}" in outcome["out"], outcome


# The commands the API image runs (test_the_api_commands_work_without_the_worker_packages).
API_COMMANDS = {"serve", "db upgrade", "runs list", "runs show", "experiments report"}


def test_every_command_is_either_an_api_or_a_batch_command() -> None:
    import typer.main

    from encore.cli import app
    from encore.cli.worker_group import WorkerCommand

    def commands(group, prefix=""):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from commands(command, f"{prefix}{name} ")
            else:
                yield f"{prefix}{name}", command

    marked, unmarked = set(), set()
    for name, command in commands(typer.main.get_command(app)):
        (marked if isinstance(command, WorkerCommand) else unmarked).add(name)
    assert unmarked == API_COMMANDS, (
        "a command that needs torch, numpy, pandas ... gets cls=WorkerCommand; one that runs "
        "in the API image goes into API_COMMANDS and its test"
    )
    assert marked == set(WORKER_COMMANDS)


def test_an_unmarked_batch_command_still_ends_in_one_line(tmp_path: Path) -> None:
    """The safety net behind WorkerCommand, for a command someone forgot to mark."""
    result = _blocked("probe", cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: No module named 'torch', a worker package: run it in")
