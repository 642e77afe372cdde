"""Sizes of the two images' Python environments, built here with the Dockerfile's own commands.

There is no Docker engine on the development machine. For each final target of the Dockerfile
(api, worker) this script builds the environment that the target copies from its build stage
(`/app/.venv`) into a temporary directory, by running that stage chain's RUN instructions as
the Dockerfile has them (read with BuildKit's parser, the `dockerfile` package): `/app/.venv`
replaced by the temporary directory, ARG defaults substituted, the stages' ENV set, the
repository as the build context. The build checks run too (no worker package in the API, the
CPU torch in the worker). It then measures the environment's apparent size, which is what its
layer holds uncompressed; an image is that layer on top of the base image (the user and /data
add a few KB).

The worker's torch comes from PyTorch's CPU index, which not every machine reaches: with
`--torch-wheel FILE` (a CPU build of torch) that file is installed instead, and the output says
which torch was measured.

Prints one JSON line.

    uv run python bench/images.py [--target api] [--torch-wheel torch-2.13.0+cpu-...whl]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dockerfile

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("api", "worker")


def stages() -> dict[str, list]:
    named: dict[str, list] = {}
    current: list = []
    for instruction in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if instruction.cmd == "FROM":
            current = []
            named[instruction.value[2]] = current
        current.append(instruction)
    return named


def chain(named: dict[str, list], name: str) -> list:
    """The stage's instructions after those of the stages it is built FROM, oldest first."""
    instructions: list = []
    while name in named:
        instructions = named[name] + instructions
        name = named[name][0].value[0]
    return instructions


def build_stage(named: dict[str, list], target: str) -> str:
    (copy,) = [i for i in named[target] if i.cmd == "COPY" and i.value[0] == "/app/.venv"]
    return copy.flags[0].removeprefix("--from=")


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m[1] or m[2]], text)


def build(named: dict[str, list], target: str, venv: Path, torch_wheel: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["UV_PROJECT_ENVIRONMENT"] = str(venv)
    env["ENCORE_HOME"] = str(venv.parent / "home")
    args: dict[str, str] = {}
    torch_source = None
    started = time.perf_counter()
    for instruction in chain(named, build_stage(named, target)):
        if instruction.cmd == "ARG":
            name, _, default = instruction.value[0].partition("=")
            args[name] = default
        elif instruction.cmd == "ENV":
            pairs = zip(instruction.value[::2], instruction.value[1::2], strict=True)
            env.update({k: substitute(v, {**env, **args}) for k, v in pairs})
        elif instruction.cmd == "RUN":
            command = substitute(instruction.value[0], args).replace("/app/.venv", str(venv))
            words = shlex.split(command)
            if words[:2] == ["uv", "sync"] and "--no-install-project" not in words:
                # The image builds the project from the copied sources; uv's cache here may
                # hold a build of older sources (it rebuilds on a change of pyproject.toml).
                command += " --reinstall-package encore"
            if "--index-url" in words:
                torch_source = args.get("TORCH_INDEX_URL")
                if torch_wheel is not None:
                    python = venv / "bin" / "python"
                    command = f"uv pip install --python {python} --no-deps {torch_wheel}"
                    torch_source = torch_wheel.name
            # The build's own output goes to stderr: stdout is the one JSON line.
            subprocess.run(
                ["/bin/sh", "-c", command], cwd=ROOT, env=env, stdout=sys.stderr, check=True
            )
    site = next((venv / "lib").glob("python3*/site-packages"))
    packages = sorted(
        ((apparent_bytes(path), path.name) for path in site.iterdir() if path.is_dir()),
        reverse=True,
    )
    result = {
        f"{target}_env_mb": round(apparent_bytes(venv) / 1e6, 1),
        f"{target}_distributions": len(list(site.glob("*.dist-info"))),
        f"{target}_build_seconds": round(time.perf_counter() - started, 1),
        f"{target}_largest_mb": {name: round(size / 1e6, 1) for size, name in packages[:6]},
    }
    if torch_source is not None:
        version = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        result |= {"torch": version, "torch_source": torch_source}
    return result


def apparent_bytes(path: Path) -> int:
    """File sizes under path, each hard-linked file once: what a layer's tar holds."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            stat = os.lstat(os.path.join(directory, name))
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=TARGETS, action="append", help="default: both")
    parser.add_argument("--torch-wheel", type=Path, help="a torch CPU wheel instead of the index")
    parser.add_argument("--keep", type=Path, help="build into this directory and keep it")
    args = parser.parse_args()
    named = stages()
    (torch_arg,) = [i for i in named["worker-build"] if i.value[0].startswith("TORCH_VERSION=")]
    result: dict = {"locked_torch": torch_arg.value[0].partition("=")[2]}
    with tempfile.TemporaryDirectory(prefix="encore-images-") as scratch:
        base = args.keep or Path(scratch)
        for target in args.target or TARGETS:
            result |= build(named, target, base / target / ".venv", args.torch_wheel)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
