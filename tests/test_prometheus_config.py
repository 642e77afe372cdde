"""Prometheus scrape config, alert rules and their unit tests (prometheus/).

promtool comes from Debian's ``prometheus`` package; without it the promtool tests skip
(and fail under CI=true).
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.promql import (
    ALERT_TESTS,
    ALERTS,
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    run_promtool,
)

EXPECTED_ALERTS = {
    "EncoreTargetDown",
    "EncoreApi5xxRatio",
    "EncoreApiLatencyP99",
    "EncoreNoPublishedRun",
    "EncoreQueuedRunWaiting",
    "EncoreColdFractionHigh",
    "EncoreDriftHigh",
    "EncoreFeedbackFailures",
    "EncorePartitionSetAside",
    "EncoreRetrainRefused",
}
SEVERITIES = {"critical", "warning", "info"}


def _yaml(path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _alert_rules() -> dict[str, dict[str, Any]]:
    rules = [rule for group in _yaml(ALERTS)["groups"] for rule in group["rules"]]
    names = [rule["alert"] for rule in rules if "alert" in rule]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    return {rule["alert"]: rule for rule in rules if "alert" in rule}


# ----------------------------------------------------------------------------- promtool


def _check(*args: str) -> None:
    result = run_promtool(*args)
    assert result.returncode == 0, (
        f"promtool {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    )


def test_promtool_check_config() -> None:
    _check("check", "config", "prometheus/prometheus.yml")


def test_promtool_check_rules() -> None:
    _check("check", "rules", "prometheus/alerts.yml")


def test_promtool_test_rules() -> None:
    _check("test", "rules", "prometheus/tests.yml")


# ----------------------------------------------------------------------------- structure


def test_scrape_jobs_target_the_compose_services() -> None:
    config = _yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {
        name: sorted(t for static in job.get("static_configs", []) for t in static["targets"])
        for name, job in jobs.items()
    }
    assert targets["encore-api"] == ["model_server:8000"]
    assert targets["encore-scheduler"] == ["scheduler:9101"]
    for name in ("encore-api", "encore-scheduler"):
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"


def test_rule_files_point_at_the_alerts() -> None:
    config = _yaml(PROMETHEUS_CONFIG)
    assert config["rule_files"] == ["alerts.yml"]
    assert (PROMETHEUS_DIR / config["rule_files"][0]).resolve() == ALERTS.resolve()
    assert _yaml(ALERT_TESTS)["rule_files"] == ["alerts.yml"]


def test_the_expected_alerts_exist() -> None:
    assert set(_alert_rules()) == EXPECTED_ALERTS


@pytest.mark.parametrize("name", sorted(EXPECTED_ALERTS))
def test_alert_has_for_severity_and_annotations(name: str) -> None:
    rule = _alert_rules()[name]
    assert "for" in rule, f"{name}: say how long the condition must hold (for:)"
    assert rule.get("labels", {}).get("severity") in SEVERITIES, f"{name}: severity label"
    annotations = rule.get("annotations", {})
    for key in ("summary", "description"):
        assert annotations.get(key, "").strip(), f"{name}: {key} annotation"
    assert any("$value" in text for text in annotations.values()), (
        f"{name}: the annotations should show the value that fired ($value)"
    )


def _alert_cases() -> dict[str, dict[str, list[dict[str, Any]]]]:
    """alertname -> {"firing": [...exp_alerts lists...], "silent": [...]} from tests.yml."""
    cases: dict[str, dict[str, list[Any]]] = {}
    for test in _yaml(ALERT_TESTS)["tests"]:
        for case in test.get("alert_rule_test", []):
            expected = case.get("exp_alerts") or []
            kind = "firing" if expected else "silent"
            cases.setdefault(case["alertname"], {"firing": [], "silent": []})[kind].append(expected)
    return cases


@pytest.mark.parametrize("name", sorted(EXPECTED_ALERTS))
def test_every_alert_is_tested_firing_and_silent(name: str) -> None:
    cases = _alert_cases().get(name, {"firing": [], "silent": []})
    assert cases["firing"], f"prometheus/tests.yml has no case where {name} fires"
    assert cases["silent"], f"prometheus/tests.yml has no case where {name} does not fire"
    severity = _alert_rules()[name]["labels"]["severity"]
    for expected in cases["firing"]:
        for alert in expected:
            assert alert.get("exp_labels", {}).get("severity") == severity
            assert set(alert.get("exp_annotations", {})) >= {"summary", "description"}, (
                f"{name}: check the rendered annotations in prometheus/tests.yml"
            )


def test_tests_only_name_existing_alerts() -> None:
    assert set(_alert_cases()) <= EXPECTED_ALERTS
