"""The trainer's one-shot script in compose.yaml, checked without a Docker engine: valid shell,
then run for real by /bin/sh with the settings compose passes it (.env.example's defaults)
against a stub `encore` that logs its calls: it generates, trains and publishes once, trains on
mounted data when told to, and fails when a step fails, so the services waiting for it do not
start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import _environment, _example_env, _interpolate
from tests.deploy import compose as compose  # fixtures, imported by name
from tests.deploy import services as services

# --- the trainer's script, run for real against a stub `encore` ------------------------------

STUB = """#!{python}
import json, os, pathlib, sys
home = pathlib.Path(os.environ["ENCORE_HOME"])
with open(home / "calls.jsonl", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == os.environ.get("STUB_FAIL"):
    sys.exit(3)
if sys.argv[1] == "generate":
    out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    for name in ("interactions.parquet", "catalog.parquet"):
        (out / name).write_text("x")
if sys.argv[1] == "train":
    (home / "bundles").mkdir(exist_ok=True)
    (home / "bundles" / "PROMOTED").write_text("v1")
"""


@pytest.fixture
def run_trainer(services: dict[str, Any], tmp_path: Path):
    command = services["trainer"]["command"]
    script = command[2]
    assert "$" not in script.replace("$$", ""), (
        "an unescaped $ in the trainer's script is interpolated by compose, not by the shell"
    )
    shell = [command[0], command[1], script.replace("$$", "$")]
    example = _example_env()
    defaults = {k: _interpolate(v, example) for k, v in _environment(services["trainer"]).items()}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "encore"
    stub.write_text(STUB.format(python=sys.executable), encoding="utf-8")
    stub.chmod(0o755)
    home = tmp_path / "data"
    home.mkdir()

    def run(**overrides: str) -> tuple[int, list[list[str]]]:
        env = {**defaults, **overrides, "ENCORE_HOME": str(home)}
        env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        calls = home / "calls.jsonl"
        calls.unlink(missing_ok=True)
        result = subprocess.run(
            shell, env=env, capture_output=True, text=True, timeout=60, check=False
        )
        logged = calls.read_text().splitlines() if calls.exists() else []
        return result.returncode, [json.loads(line) for line in logged]

    run.home = home  # type: ignore[attr-defined]
    return run


def test_trainer_script_is_valid_shell(services: dict[str, Any]) -> None:
    command = services["trainer"]["command"]
    script = command[2].replace("$$", "$")
    result = subprocess.run(
        ["/bin/sh", "-n", "-c", script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_trainer_generates_trains_and_publishes_by_default(run_trainer) -> None:
    home = run_trainer.home
    code, calls = run_trainer()
    assert code == 0
    generated = f"{home}/generated"
    assert calls == [
        ["generate", "--users", "20000", "--playlists", "5000", "--out", generated],
        [
            "train",
            "--interactions",
            f"{generated}/interactions.parquet",
            "--catalog",
            f"{generated}/catalog.parquet",
        ],
        ["run"],
    ]
    # Next `docker compose up`: a promoted model exists, nothing to do.
    assert run_trainer() == (0, [])
    # Forced: trains again on the data already generated.
    code, calls = run_trainer(TRAIN_ALWAYS="1")
    assert code == 0 and [call[0] for call in calls] == ["train", "run"]


def test_trainer_trains_on_mounted_data(run_trainer) -> None:
    code, calls = run_trainer(
        TRAIN_INTERACTIONS="/input/my plays.csv", TRAIN_CATALOG="/input/play lists.csv"
    )
    assert code == 0
    assert calls == [
        ["train", "--interactions", "/input/my plays.csv", "--catalog", "/input/play lists.csv"],
        ["run"],
    ]
    code, calls = run_trainer(TRAIN_INTERACTIONS="/input/plays.tsv", TRAIN_ALWAYS="1")
    assert code == 0 and calls == [["train", "--interactions", "/input/plays.tsv"], ["run"]]


def test_trainer_fails_when_a_step_fails(run_trainer) -> None:
    """A failed step fails the one-shot, so the services that wait for it do not start."""
    steps = ["generate", "train", "run"]
    for failing in steps:
        promoted = run_trainer.home / "bundles" / "PROMOTED"
        promoted.unlink(missing_ok=True)
        code, calls = run_trainer(STUB_FAIL=failing, TRAIN_ALWAYS="1")
        assert code != 0, f"the trainer exits 0 although `encore {failing}` failed"
        assert calls[-1][0] == failing, calls
