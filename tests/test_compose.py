"""compose.yaml, checked without a Docker engine: validated against the Compose Specification's
JSON schema (the copy that check-jsonschema vendors, `--builtin-schema vendor.compose-spec`),
then the stack's own rules: start order, published ports, volumes, mounted config files,
settings; and .env.example, which documents every variable compose.yaml interpolates, with the
same defaults. check-jsonschema is a dev dependency (`uv sync` installs it); without it the
schema tests skip with the reason, under CI=true they fail."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import (
    COMPOSE,
    ENCORE_SERVICES,
    ENV_EXAMPLE,
    ROOT,
    _env_example,
    _environment,
    _example_env,
    _interpolate,
    _is_required,
    _references,
    _tool_missing,
)
from tests.deploy import compose as compose  # fixtures, imported by name
from tests.deploy import services as services

ONE_SHOT = ("migrate", "trainer")
ALLOWED_CONDITIONS = {"service_healthy", "service_completed_successfully"}
PUBLISHED = {"model_server": {8000}, "grafana": {3000}, "prometheus": {9090}}


# --- compose.yaml helpers --------------------------------------------------------------------


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
        "ray-head",
        "ray-worker",
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


def test_the_ray_profile_is_a_head_and_a_worker_of_the_worker_image(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`docker compose --profile ray up`: a Ray cluster for `encore run --engine ray`."""
    from encore.settings import Settings

    profiled = {name for name, service in services.items() if service.get("profiles")}
    assert profiled == {"ray-head", "ray-worker"}, "only the Ray nodes are optional"
    head, worker = services["ray-head"], services["ray-worker"]
    for name, node in (("ray-head", head), ("ray-worker", worker)):
        assert node["profiles"] == ["ray"], name
        assert node["build"]["target"] == "worker", f"{name}: Ray is in the worker image"
        assert node["command"][:2] == ["ray", "start"] and "--block" in node["command"], name
        # The actors read the bundle by its path: ENCORE_HOME is the same volume everywhere.
        targets = {m["target"]: m.get("source") for m in _volume_mounts(node)}
        assert targets.get("/data") == "encore-data", name
        assert _environment(node)["ENCORE_HOME"] == "/data", name
        assert node.get("init") is True and "ports" not in node, name
    assert "--head" in head["command"] and "--port=6379" in head["command"]
    assert "--num-cpus=0" in head["command"], "the driver's node holds no scoring actor"
    assert "--address=ray-head:6379" in worker["command"]
    assert worker["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    env = _example_env()
    for key, value in _environment(head).items():
        if key.startswith("ENCORE_"):
            monkeypatch.setenv(key, _interpolate(value, env))
    settings = Settings()
    assert (settings.engine, settings.ray_address) == ("ray", "auto")


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
