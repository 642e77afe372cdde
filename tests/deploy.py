"""Shared by the deployment files' tests (test_compose.py, test_compose_trainer.py,
test_dockerfile.py and test_image_packages.py): the repository's paths, compose.yaml as parsed
(the ``compose`` and ``services`` fixtures) and interpolated with .env.example's values, and the
Dockerfile as BuildKit's parser reads it (the ``instructions`` fixture), stage by stage. The
fixtures are imported by name; a missing tool skips with the reason, under CI=true it fails."""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
PYPROJECT = ROOT / "pyproject.toml"

ENCORE_SERVICES = ("migrate", "trainer", "scheduler", "model_server")
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")


def _tool_missing(tool: str, why: str) -> None:
    message = f"{tool} is not available ({why}); `uv sync` installs it with the dev group"
    if IN_CI:
        pytest.fail(f"CI=true: {message}", pytrace=False)
    pytest.skip(message)


# --- compose.yaml helpers --------------------------------------------------------------------


@functools.cache
def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture
def compose() -> dict[str, Any]:
    return copy.deepcopy(_compose())


@pytest.fixture
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=value: {line!r}"
            values[name.strip()] = value
    return values


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _references(compose: dict[str, Any]) -> dict[str, set[tuple[str, str]]]:
    """Every ${NAME...} that compose interpolates: NAME -> {(operator, argument)}."""
    found: dict[str, set[tuple[str, str]]] = {}
    for text in _strings(compose):
        for name, operator, argument in INTERPOLATION.findall(text.replace("$$", "")):
            found.setdefault(name, set()).add((operator, argument))
    return found


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation, for the forms compose.yaml uses; `$$` is a literal `$`."""

    def replace(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        value = env.get(name)
        if operator in (":-", "-"):
            return value if value or (operator == "-" and value is not None) else argument
        if operator in (":?", "?"):
            assert value, f"compose would refuse to start: {argument}"
            return value
        assert operator is None, f"unexpected interpolation {match.group(0)}"
        return value or ""

    parts = text.split("$$")
    return "$".join(INTERPOLATION.sub(replace, part) for part in parts)


def _example_env() -> dict[str, str]:
    """.env.example as a user fills it in: the required secrets set."""
    env = _env_example()
    for name, value in env.items():
        if not value:
            env[name] = "example-secret" if _is_required(name) else ""
    return env


def _is_required(name: str) -> bool:
    return any(op in (":?", "?") for op, _ in _references(_compose()).get(name, ()))


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


# --- Dockerfile: its stages, as BuildKit parses them -----------------------------------------


@pytest.fixture(scope="module")
def instructions() -> list[Any]:
    """The Dockerfile as BuildKit's parser reads it."""
    if importlib.util.find_spec("dockerfile") is None:
        _tool_missing("dockerfile (BuildKit's parser)", "the module dockerfile is not installed")
    import dockerfile

    return list(dockerfile.parse_file(str(DOCKERFILE)))


def _stages(instructions: list[Any]) -> list[list[Any]]:
    stages: list[list[Any]] = []
    for instruction in instructions:
        if instruction.cmd == "FROM":
            stages.append([])
        assert stages, f"{instruction.cmd} before the first FROM"
        stages[-1].append(instruction)
    return stages


def _named_stages(instructions: list[Any]) -> dict[str, list[Any]]:
    """Stages by their `AS` name (every stage of this Dockerfile has one)."""
    named = {}
    for stage in _stages(instructions):
        words = stage[0].value
        assert len(words) == 3 and words[1].lower() == "as", f"unnamed stage: {stage[0].original}"
        assert words[2] not in named, f"two stages named {words[2]}"
        named[words[2]] = stage
    return named


def _chain(instructions: list[Any], name: str) -> list[Any]:
    """A stage's instructions after those of the stages it is built FROM, oldest first."""
    named = _named_stages(instructions)
    chain: list[Any] = []
    while name in named:
        chain = named[name] + chain
        name = named[name][0].value[0]
    return chain


def _runs(stage: list[Any], needle: str) -> list[Any]:
    return [i for i in stage if i.cmd == "RUN" and needle in i.value[0]]
