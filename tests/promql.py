"""The PromQL of Encore's dashboards and alert rules, and the metric names it may use.

``all_expressions()`` returns every PromQL expression of ``grafana/dashboards/*.json`` and
``prometheus/alerts.yml``, each with where it comes from; ``Expression.promql`` has Grafana's
variables ($__rate_interval, ...) replaced so it can be sent to Prometheus as it is.
tests/test_grafana_dashboards.py parses them all with promtool and checks their metric names;
an integration test can reuse them to run every expression against a live Prometheus.

This is a helper module, not a test module (``from tests.promql import ...``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "tests.yml"
GRAFANA_DIR = ROOT / "grafana"
DASHBOARDS_DIR = GRAFANA_DIR / "dashboards"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "encore.yml"

IN_CI = os.environ.get("CI", "").lower() == "true"

# Values for Grafana's built-in variables; the datasource's timeInterval is 15s, so
# $__rate_interval is at least 1m, and 5m is what a 6h range typically gets.
GRAFANA_VARIABLES = {
    "__rate_interval": "5m",
    "__rate_interval_ms": "300000",
    "__interval": "1m",
    "__interval_ms": "60000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))|\[\[(\w+)(?::\w+)?\]\]")

# prometheus-fastapi-instrumentator's default metrics (handler, method, status grouped "2xx").
INSTRUMENTATOR_METRICS = frozenset(
    {
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "http_request_duration_seconds_sum",
        "http_request_duration_seconds_count",
        "http_request_duration_highr_seconds_bucket",
        "http_request_duration_highr_seconds_sum",
        "http_request_duration_highr_seconds_count",
        "http_request_size_bytes_sum",
        "http_request_size_bytes_count",
        "http_response_size_bytes_sum",
        "http_response_size_bytes_count",
    }
)
# Series Prometheus itself adds for every scrape target.
SCRAPE_METRICS = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
    }
)

_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


@dataclass(frozen=True)
class Expression:
    """One PromQL expression: ``source`` says where it is, ``expr`` is it as written."""

    source: str
    expr: str

    @property
    def promql(self) -> str:
        """The expression with Grafana's variables replaced (unknown variables are kept)."""
        return substitute_grafana_variables(self.expr)


def substitute_grafana_variables(expr: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2) or match.group(3)
        return GRAFANA_VARIABLES.get(name, match.group(0))

    return _VARIABLE.sub(replace, expr)


# ----------------------------------------------------------------------------- extraction


def load_dashboards() -> dict[Path, dict[str, Any]]:
    return {
        path: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(DASHBOARDS_DIR.glob("*.json"))
    }


def iter_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_expressions(path: Path, dashboard: dict[str, Any] | None = None) -> list[Expression]:
    dashboard = dashboard if dashboard is not None else json.loads(path.read_text("utf-8"))
    found = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            if "expr" in target:
                where = f"{path.name}: panel {panel.get('title')!r} target {target.get('refId')}"
                found.append(Expression(where, target["expr"]))
    return found


def rule_expressions(path: Path = ALERTS) -> list[Expression]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    found = []
    for group in document.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            found.append(Expression(f"{path.name}: {group['name']}/{name}", rule["expr"]))
    return found


def all_expressions() -> list[Expression]:
    """Every PromQL expression of the dashboards and the alert rules."""
    found = []
    for path, dashboard in load_dashboards().items():
        found.extend(dashboard_expressions(path, dashboard))
    found.extend(rule_expressions(ALERTS))
    return found


def recording_rules(expressions: list[Expression]) -> str:
    """A rules file recording each expression as ``encore_check:expr_<index>`` (for promtool)."""
    rules = [
        {"record": f"encore_check:expr_{index}", "expr": expression.promql}
        for index, expression in enumerate(expressions)
    ]
    return yaml.safe_dump({"groups": [{"name": "encore-check", "rules": rules}]}, sort_keys=False)


# ----------------------------------------------------------------------------- metric names

_TOKEN = re.compile(
    r"""
      (?P<ws>\s+)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<number>[0-9][0-9a-zA-Z_.]*|\.[0-9]+)
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],@:])
    """,
    re.VERBOSE,
)
_AGGREGATIONS = frozenset(
    {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
     "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
)  # fmt: skip
_LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"bool", "offset", "and", "or", "unless", "atan2", "inf", "nan"})


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"unexpected {expr[position]!r} at {position} in {expr!r}")
        if match.lastgroup not in ("ws", "comment"):
            tokens.append((match.lastgroup, match.group()))
        position = match.end()
    return tokens


def _skip_to(tokens: list[tuple[str, str]], start: int, closing: str, expr: str) -> int:
    """Index of the first ``closing`` token at or after ``start``."""
    for index in range(start, len(tokens)):
        if tokens[index][1] == closing:
            return index
    raise ValueError(f"missing {closing!r} in {expr!r}")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (a lexical scan, not a full parser).

    Label names in matchers and in by/without/on/ignoring/group_* lists, function and
    aggregation names, keywords, durations and strings are not metric names;
    ``{__name__="x"}`` is. Raises ValueError on characters PromQL does not have (such as a
    Grafana variable left in the expression).
    """
    tokens = _tokens(expr)
    names: set[str] = set()
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1][1] if index + 1 < len(tokens) else None
        if text == "{":
            end = _skip_to(tokens, index, "}", expr)
            for position in range(index + 1, end - 2):
                (_, label), (_, op), (value_kind, value) = tokens[position : position + 3]
                if label == "__name__" and op == "=" and value_kind == "string":
                    names.add(value[1:-1])
            index = end + 1
        elif text == "[":
            index = _skip_to(tokens, index, "]", expr) + 1
        elif kind == "ident" and text.lower() in _LABEL_LISTS and following == "(":
            index = _skip_to(tokens, index, ")", expr) + 1
        elif kind == "ident" and (
            following == "(" or text.lower() in _AGGREGATIONS or text.lower() in _KEYWORDS
        ):
            index += 1
        elif kind == "ident" and text.lower() in _LABEL_LISTS:
            index += 1  # group_left / group_right without a label list
        else:
            if kind == "ident":
                names.add(text)
            index += 1
    return names


def encore_metric_types() -> dict[str, str]:
    """Each metric name constant of encore.metric_names with its type from the module's table.

    An info metric may be documented under its exported ``_info`` name. A constant the table
    does not document maps to "" (tests/test_grafana_dashboards.py reports it).
    """
    from encore import metric_names as metrics

    documented = dict(
        re.findall(
            r"^(encore_[a-z0-9_]+)\s+(counter|gauge|histogram|summary|info)\b",
            metrics.__doc__ or "",
            re.MULTILINE,
        )
    )
    constants = {
        value
        for name, value in vars(metrics).items()
        if name.isupper() and isinstance(value, str) and value.startswith("encore_")
    }
    return {
        name: documented.get(name) or documented.get(f"{name}_info") or "" for name in constants
    }


def exported_series(name: str, kind: str) -> set[str]:
    """The series names prometheus_client exports for a metric of this name and type."""
    if not kind:  # unknown type: accept every suffix rather than guess
        return {name} | {name + suffix for suffixes in _SUFFIXES.values() for suffix in suffixes}
    return {
        name if not suffix or name.endswith(suffix) else name + suffix for suffix in _SUFFIXES[kind]
    }


def encore_series() -> dict[str, str]:
    """Every series name the Encore processes export -> the metric name in encore.metric_names."""
    return {
        series: name
        for name, kind in encore_metric_types().items()
        for series in exported_series(name, kind)
    }


def known_metric_names() -> set[str]:
    """Names a dashboard or alert may select: the instrumentator's, encore's, ``up``..."""
    return set(INSTRUMENTATOR_METRICS) | set(SCRAPE_METRICS) | set(encore_series())


# ----------------------------------------------------------------------------- promtool


def promtool() -> str:
    """promtool's path; skips the test without it (fails under CI=true)."""
    path = shutil.which("promtool")
    if path is None:
        message = "promtool is not installed (Debian: apt-get install -y prometheus)"
        if IN_CI:
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    return path


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
