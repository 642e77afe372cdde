"""Grafana provisioning and dashboards (grafana/), and the PromQL of dashboards and alerts.

Every expression (dashboards and prometheus/alerts.yml) must parse, checked offline by
``promtool check rules`` on a temporary rules file, and may only select metric names that
exist: prometheus-fastapi-instrumentator's, Prometheus' ``up``, or a name from encore.metric_names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.promql import (
    DASHBOARD_PROVIDERS,
    DASHBOARDS_DIR,
    DATASOURCES,
    INSTRUMENTATOR_METRICS,
    Expression,
    all_expressions,
    encore_metric_types,
    encore_series,
    exported_series,
    iter_panels,
    known_metric_names,
    load_dashboards,
    metric_names,
    recording_rules,
    rule_expressions,
    run_promtool,
    substitute_grafana_variables,
)

DATASOURCE_UID = "encore-prometheus"
DASHBOARDS = {"encore-api.json": ("encore-api", "Encore API"),
              "encore-model.json": ("encore-model", "Encore model")}  # fmt: skip
PANEL_TYPES = {"row", "timeseries", "stat", "heatmap"}
REQUIRED_PANELS = {
    "encore-api": {
        "Request rate by route": "timeseries",
        "Error ratio by route": "timeseries",
        "Latency p50 / p95 / p99 by route": "timeseries",
        "Users served by source": "timeseries",
        "Feedback rate by outcome": "timeseries",
        "Current run age": "timeseries",
        "Store read latency": "timeseries",
    },
    "encore-model": {
        "Users scored per run": "timeseries",
        "Run duration": "timeseries",
        "Time since last success": "timeseries",
        "Cold fraction over time": "timeseries",
        "Popularity deciles of recommended playlists": "heatmap",
        "Drift score (PSI)": "timeseries",
        "Like rate per model version": "timeseries",
        "Run failures by reason": "timeseries",
        "Lock contention": "timeseries",
    },
}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: dashboard for path, dashboard in load_dashboards().items()}


def _datasource() -> dict[str, Any]:
    return {"type": "prometheus", "uid": DATASOURCE_UID}


# ----------------------------------------------------------------------------- provisioning


def test_datasource_is_provisioned_with_the_fixed_uid() -> None:
    document = _yaml(DATASOURCES)
    assert document["apiVersion"] == 1
    (datasource,) = document["datasources"]
    assert datasource["uid"] == DATASOURCE_UID
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["access"] == "proxy"
    assert datasource.get("isDefault") is True


def test_dashboard_provider_loads_the_mounted_directory() -> None:
    document = _yaml(DASHBOARD_PROVIDERS)
    assert document["apiVersion"] == 1
    (provider,) = document["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


# ----------------------------------------------------------------------------- dashboards


def test_the_expected_dashboards_exist_with_stable_unique_uids(
    dashboards: dict[str, dict[str, Any]],
) -> None:
    assert set(dashboards) == set(DASHBOARDS)
    uids = [dashboard["uid"] for dashboard in dashboards.values()]
    assert len(uids) == len(set(uids))
    for name, dashboard in dashboards.items():
        uid, title = DASHBOARDS[name]
        assert dashboard["uid"] == uid
        assert dashboard["title"] == title
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", uid)
        assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 39
        assert dashboard.get("id") is None, "provisioned dashboards must not carry a database id"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_dashboard_is_self_contained(name: str) -> None:
    text = (DASHBOARDS_DIR / name).read_text(encoding="utf-8")
    assert "__inputs" not in json.loads(text), "an export 'for sharing externally' needs inputs"
    assert "${DS_" not in text, "datasources are referenced by the provisioned uid"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_panels_reference_the_provisioned_datasource(
    name: str, dashboards: dict[str, dict[str, Any]]
) -> None:
    for panel in iter_panels(dashboards[name]):
        title = panel.get("title")
        assert panel.get("type") in PANEL_TYPES, f"{title}: panel type {panel.get('type')}"
        assert title, f"panel {panel.get('id')} has no title"
        if panel["type"] == "row":
            continue
        assert panel.get("datasource") == _datasource(), f"{title}: panel datasource"
        targets = panel.get("targets", [])
        assert targets, f"{title}: no query"
        ref_ids = [target.get("refId") for target in targets]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), f"{title}: refIds {ref_ids}"
        for target in targets:
            assert target.get("datasource") == _datasource(), f"{title}: target datasource"
            expr = target.get("expr")
            assert isinstance(expr, str) and expr.strip(), f"{title}: target without expr"


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_panel_ids_and_titles_are_unique_and_the_grid_does_not_overlap(
    name: str, dashboards: dict[str, dict[str, Any]]
) -> None:
    panels = list(iter_panels(dashboards[name]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    titles = [panel["title"] for panel in panels]
    assert len(titles) == len(set(titles)), f"duplicate panel titles: {titles}"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                other = cells.setdefault((x, y), panel["title"])
                assert other == panel["title"], f"{panel['title']!r} overlaps {other!r}"


@pytest.mark.parametrize("uid", sorted(REQUIRED_PANELS))
def test_required_panels_exist(uid: str, dashboards: dict[str, dict[str, Any]]) -> None:
    (dashboard,) = [d for d in dashboards.values() if d["uid"] == uid]
    types = {panel["title"]: panel["type"] for panel in iter_panels(dashboard)}
    for title, kind in REQUIRED_PANELS[uid].items():
        assert types.get(title) == kind, f"{uid}: missing {kind} panel {title!r}"


def test_popularity_heatmap_reads_the_decile_buckets(dashboards: dict[str, dict[str, Any]]) -> None:
    heatmaps = [
        panel
        for dashboard in dashboards.values()
        for panel in iter_panels(dashboard)
        if panel["type"] == "heatmap"
    ]
    assert heatmaps
    for panel in heatmaps:
        for target in panel["targets"]:
            assert target.get("format") == "heatmap"
            assert "encore_recommended_popularity_decile_bucket" in metric_names(
                substitute_grafana_variables(target["expr"])
            )
            assert re.search(r"\bby\s*\(\s*le\s*\)", target["expr"])


# ----------------------------------------------------------------------------- PromQL


@pytest.fixture(scope="module")
def expressions() -> list[Expression]:
    found = all_expressions()
    assert len(rule_expressions()) >= 7
    assert len(found) > len(rule_expressions()), "no dashboard expressions found"
    return found


def test_every_expression_parses(expressions: list[Expression], tmp_path: Path) -> None:
    rules = tmp_path / "expressions.yml"
    rules.write_text(recording_rules(expressions), encoding="utf-8")
    result = run_promtool("check", "rules", rules)
    if result.returncode != 0:
        failed = sorted({int(i) for i in re.findall(r"expr_(\d+)", result.stdout + result.stderr)})
        where = "\n".join(f"  {expressions[i].source}: {expressions[i].promql}" for i in failed)
        pytest.fail(f"promtool check rules failed:\n{result.stdout}{result.stderr}\n{where}")


def test_no_grafana_variable_is_left_unreplaced(expressions: list[Expression]) -> None:
    for expression in expressions:
        assert "$" not in expression.promql, f"{expression.source}: {expression.promql}"


def test_every_metric_name_is_exported(expressions: list[Expression]) -> None:
    known = known_metric_names()
    unknown = {
        f"{expression.source}: {name}"
        for expression in expressions
        for name in metric_names(expression.promql)
        if name not in known
    }
    assert not unknown, (
        "metric names that neither the instrumentator nor encore/metric_names.py export:\n  "
        + "\n  ".join(sorted(unknown))
    )


def test_every_encore_metric_is_documented_with_a_type() -> None:
    undocumented = sorted(name for name, kind in encore_metric_types().items() if not kind)
    assert not undocumented, f"encore/metric_names.py's table gives no type for {undocumented}"


def test_every_encore_metric_is_on_a_dashboard(dashboards: dict[str, dict[str, Any]]) -> None:
    used = {
        name
        for path in dashboards
        for expression in all_expressions()
        if expression.source.startswith(path)
        for name in metric_names(expression.promql)
    }
    unused = sorted(
        name
        for name, kind in encore_metric_types().items()
        if not exported_series(name, kind) & used
    )
    assert not unused, f"encore/metric_names.py names no dashboard shows: {unused}"


def test_api_dashboard_uses_the_instrumentator_metrics(expressions: list[Expression]) -> None:
    used = {
        name
        for expression in expressions
        if expression.source.startswith("encore-api.json")
        for name in metric_names(expression.promql)
    }
    assert {"http_requests_total", "http_request_duration_seconds_bucket"} <= used
    assert used & INSTRUMENTATOR_METRICS


# ----------------------------------------------------------------------------- the helpers


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up == 0", {"up"}),
        ('rate(http_requests_total{job="encore-api", status="5xx"}[5m])', {"http_requests_total"}),
        (
            "histogram_quantile(0.99, sum by (le, handler) (rate(x_bucket[$__rate_interval])))",
            {"x_bucket"},
        ),
        ("sum without (instance) (a) / on (job) group_left (run_id) b_info", {"a", "b_info"}),
        ("time() - max(last_success) > 26 * 3600", {"last_success"}),
        ("max_over_time(g[1h:5m] offset 1d) and bool_metric", {"g", "bool_metric"}),
        ('{__name__="via_name", le="1.0"} or vector(0)', {"via_name"}),
        ("SUM BY (job) (rate(c_total[5m])) > bool 0", {"c_total"}),
        ('count by (model_version, run_id) (info{x=~"a|b", y!="by(z)"})', {"info"}),
    ],
)
def test_metric_names_finds_only_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(Expression("test", expr).promql) == names


def test_a_typo_in_a_metric_name_is_caught() -> None:
    typo = "sum(rate(encore_users_serverd_total[5m]))"
    assert metric_names(typo) - known_metric_names() == {"encore_users_serverd_total"}


def test_grafana_variables_are_replaced() -> None:
    expression = Expression(
        "test", "rate(a[$__rate_interval]) + rate(b[${__interval}]) + $__range_s"
    )
    assert expression.promql == "rate(a[5m]) + rate(b[1m]) + 3600"
    with pytest.raises(ValueError, match=r"\$"):
        metric_names(Expression("test", "rate(a{instance=~$instance}[5m])").promql)


def test_encore_series_follow_the_metric_types() -> None:
    series = encore_series()
    assert series["encore_store_read_seconds_bucket"] == "encore_store_read_seconds"
    assert series["encore_users_served_total"] == "encore_users_served_total"
    assert series["encore_serving_run_info"] == "encore_serving_run"
    assert series["encore_run_drift_score"] == "encore_run_drift_score"
