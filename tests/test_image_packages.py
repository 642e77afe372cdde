"""What the images install, checked against uv.lock without a Docker engine: torch is the locked
version from PyTorch's CPU index, no CUDA package of the lock is ever installed, and the API
image reaches no worker package through uv.lock's dependency graph (`uv export` agrees); the
slow test runs the API build stage's own commands and measures its environment. The Dockerfile
is read as BuildKit's parser reads it (tests/deploy.py)."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import PYPROJECT, ROOT, _chain, _named_stages, _runs, _tool_missing
from tests.deploy import instructions as instructions  # fixtures, imported by name

LOCK = ROOT / "uv.lock"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Packages that exist only for torch's CUDA build (see the Dockerfile's comment).
CUDA_NAME = re.compile(r"^(nvidia-.+|cuda-.+|triton)$")


def _option_values(command: str, option: str) -> list[str]:
    words = shlex.split(command)
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == option]


def _arg(stage: list[Any], name: str) -> str:
    for instruction in stage:
        if instruction.cmd == "ARG" and instruction.value[0].startswith(f"{name}="):
            return instruction.value[0].partition("=")[2]
    raise AssertionError(f"no ARG {name}")


def _lock() -> list[dict[str, Any]]:
    return tomllib.loads(LOCK.read_text(encoding="utf-8"))["package"]


def _dependencies(package: dict[str, Any]) -> set[str]:
    names = {dep["name"] for dep in package.get("dependencies", [])}
    for deps in package.get("optional-dependencies", {}).values():
        names |= {dep["name"] for dep in deps}
    return names


# --- Dockerfile: the worker image's torch, against uv.lock -----------------------------------


def test_torch_is_the_locked_version_from_the_cpu_index(instructions: list[Any]) -> None:
    worker = _named_stages(instructions)["worker-build"]
    (torch,) = [p for p in _lock() if p["name"] == "torch"]
    assert _arg(worker, "TORCH_VERSION") == torch["version"], (
        "uv.lock's torch changed: update TORCH_VERSION (and the CUDA list) in the Dockerfile"
    )
    assert _arg(worker, "TORCH_INDEX_URL") == CPU_INDEX
    (install,) = _runs(_chain(instructions, "worker-build"), "uv pip install")
    words = shlex.split(install.value[0])
    assert "--no-deps" in words
    assert _option_values(install.value[0], "--index-url") == ["${TORCH_INDEX_URL}"]
    assert "torch==${TORCH_VERSION}" in words
    # Only the Dockerfile uses the CPU index: the project's lock stays resolvable from PyPI.
    for path in (PYPROJECT, LOCK):
        assert "download.pytorch.org" not in path.read_text(encoding="utf-8"), path.name


def test_no_cuda_package_of_the_lock_is_installed(instructions: list[Any]) -> None:
    worker = _named_stages(instructions)["worker-build"]
    packages = _lock()
    names = {p["name"] for p in packages}
    cuda = {name for name in names if CUDA_NAME.match(name)}
    assert cuda, "uv.lock has no CUDA packages any more: simplify the Dockerfile"
    expected = cuda | {"torch"}
    # The exclusions are closed: whatever an excluded package pulls in is excluded too.
    for package in packages:
        if package["name"] in cuda:
            assert _dependencies(package) <= expected, package["name"]
    syncs = _runs(worker, "uv sync")
    assert len(syncs) == 2
    # The ray extra (the Ray engine, compose's ray profile) brings no CUDA package nor torch.
    by_ray = _installed_by(packages, set(), {"ray"}) - _installed_by(packages, set())
    assert "ray" in by_ray and not by_ray & expected, sorted(by_ray & expected)
    for sync in syncs:
        assert _selected_groups(sync.value[0]) == {"worker"}, sync.original
        assert _selected_extras(sync.value[0]) == {"ray"}, sync.original
        skipped = _option_values(sync.value[0], "--no-install-package")
        assert len(skipped) == len(set(skipped)), "a package is listed twice"
        assert set(skipped) <= names, f"not in uv.lock: {sorted(set(skipped) - names)}"
        assert set(skipped) == expected, (
            f"missing: {sorted(expected - set(skipped))}, extra: {sorted(set(skipped) - expected)}"
        )
    # An exact sync after the torch install would uninstall the CPU build.
    assert "--inexact" in shlex.split(syncs[1].value[0])
    # Everything else the worker image needs comes from the API's dependency layer, which
    # installs no CUDA package either (next test).
    assert _chain(instructions, "worker-build")[0] is _named_stages(instructions)["builder"][0]


# --- Dockerfile: what the API image installs, by uv.lock's dependency graph -----------------

# How uv picks dependency groups from these flags (uv's "Default groups" documentation).
GROUP_FLAGS = {"--no-default-groups", "--group", "--no-group", "--no-dev"}
UNMODELLED = {"--all-groups", "--only-group", "--only-dev", "--dev", "--all-extras"}


def _selected_groups(command: str) -> set[str]:
    words = shlex.split(command)
    assert not UNMODELLED & set(words), f"extend _selected_groups for {UNMODELLED & set(words)}"
    uv = tomllib.loads(PYPROJECT.read_text(encoding="utf-8")).get("tool", {}).get("uv", {})
    defaults = uv.get("default-groups", ["dev"])
    assert defaults != "all", "extend _selected_groups for default-groups = 'all'"
    groups = set() if "--no-default-groups" in words else set(defaults)
    groups |= set(_option_values(command, "--group"))
    groups -= set(_option_values(command, "--no-group"))
    if "--no-dev" in words:
        groups.discard("dev")
    return groups


def _selected_extras(command: str) -> set[str]:
    return set(_option_values(command, "--extra"))


def _installed_by(
    packages: list[dict[str, Any]], groups: set[str], extras: set[str] = frozenset()
) -> set[str]:
    """Every package a sync of the project with these groups and extras can install, on any
    platform.

    Markers are ignored (a package needed on some platform counts), extras are followed.
    """
    by_name: dict[str, list[dict[str, Any]]] = {}
    for package in packages:
        by_name.setdefault(package["name"], []).append(package)
    (project,) = by_name["encore"]
    pending = list(project.get("dependencies", []))
    for group in groups:
        pending += project.get("dev-dependencies", {})[group]
    for extra in extras:
        pending += project.get("optional-dependencies", {})[extra]
    seen: set[tuple[str, str | None]] = set()
    while pending:
        dependency = pending.pop()
        for extra in (None, *dependency.get("extra", [])):
            if (dependency["name"], extra) in seen:
                continue
            seen.add((dependency["name"], extra))
            for package in by_name[dependency["name"]]:
                if extra is None:
                    pending += package.get("dependencies", [])
                else:
                    pending += package.get("optional-dependencies", {}).get(extra, [])
    return {name for name, _ in seen}


def _worker_only(packages: list[dict[str, Any]]) -> set[str]:
    """What the API image must never contain: the worker group, Ray and the CUDA stack."""
    worker = {dep["name"] for dep in _project(packages)["dev-dependencies"]["worker"]}
    cuda = {p["name"] for p in packages if CUDA_NAME.match(p["name"])}
    assert {"torch", "faiss-cpu", "scipy"} <= worker
    return worker | cuda | {"ray"}


def _project(packages: list[dict[str, Any]]) -> dict[str, Any]:
    (project,) = [p for p in packages if p["name"] == "encore"]
    return project


def test_the_api_image_installs_no_worker_package(instructions: list[Any]) -> None:
    packages = _lock()
    forbidden = _worker_only(packages)
    syncs = _runs(_chain(instructions, "api-build"), "uv sync")
    assert len(syncs) == 2
    for sync in syncs:
        assert set(shlex.split(sync.value[0])) & GROUP_FLAGS <= {"--no-default-groups"}
        groups = _selected_groups(sync.value[0])
        assert groups == set(), f"the API image installs the groups {groups}"
        assert _selected_extras(sync.value[0]) == set(), "the API image installs an extra"
        pulled = _installed_by(packages, groups) & forbidden
        assert not pulled, f"the API image would install {sorted(pulled)}"
    # The walk sees what it must: with the worker group, torch and its CUDA stack.
    assert forbidden <= _installed_by(packages, {"worker"}, {"ray"})


def test_a_dependency_that_drags_torch_into_the_api_image_is_found() -> None:
    packages = copy.deepcopy(_lock())
    (rich,) = [p for p in packages if p["name"] == "rich"]
    rich.setdefault("dependencies", []).append({"name": "torch"})
    assert {"torch", "triton"} <= _installed_by(packages, set())
    # Through an extra too: uvicorn[standard] is how the project asks for uvloop.
    packages = copy.deepcopy(_lock())
    (uvicorn,) = [p for p in packages if p["name"] == "uvicorn"]
    uvicorn["optional-dependencies"]["standard"].append({"name": "scipy"})
    assert "scipy" in _installed_by(packages, set())


def _uv() -> str:
    found = os.environ.get("UV") or shutil.which("uv")
    if not found:
        _tool_missing("uv", "no UV variable (set by `uv run`) and no uv on PATH")
    return found  # type: ignore[return-value]


def test_uv_itself_agrees_on_what_the_api_image_installs(instructions: list[Any]) -> None:
    """`uv export` with the API syncs' group flags lists exactly what the walk above finds."""
    (project_sync,) = _runs(_named_stages(instructions)["api-build"], "uv sync")
    words = shlex.split(project_sync.value[0])
    flags = [w for w in words if w in GROUP_FLAGS]
    result = subprocess.run(
        [_uv(), "export", "--locked", "--offline", "--no-hashes", "--no-emit-project", *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    exported = {
        re.split(r"[\s=\[;]", line, maxsplit=1)[0]
        for line in result.stdout.splitlines()
        if line and not line.startswith(("#", " "))
    }
    packages = _lock()
    assert exported == _installed_by(packages, _selected_groups(project_sync.value[0]))
    assert not exported & _worker_only(packages)


# Uncompressed size of the API image's environment layer; 75.6 MB on 2026-11-29 (README).
API_ENV_BUDGET_MB = 100


@pytest.mark.slow
def test_the_api_stage_builds_with_uv_and_stays_small(
    instructions: list[Any], tmp_path: Path
) -> None:
    """The API build stage's own commands, run here by bench/images.py, including its check.

    That check imports the app and fails if any worker package is in the environment.
    """
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "images.py"), "--target", "api", "--keep", tmp_path],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    measured = json.loads(result.stdout)
    site = next((tmp_path / "api" / ".venv" / "lib").glob("python3*/site-packages"))
    installed = {
        re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        for dist in importlib.metadata.distributions(path=[str(site)])
    }
    assert {"encore", "fastapi", "uvicorn", "psycopg"} <= installed
    assert not installed & _worker_only(_lock()), installed & _worker_only(_lock())
    assert measured["api_env_mb"] <= API_ENV_BUDGET_MB, (
        f"the API environment grew to {measured['api_env_mb']} MB: if that is intended, update "
        "the budget here and the figures in README.md"
    )
