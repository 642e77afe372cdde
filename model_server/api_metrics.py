"""The model server's own Prometheus metrics (names in encore.metric_names)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info

from encore import metric_names as names

USERS_SERVED = Counter(
    names.USERS_SERVED.removesuffix("_total"), "Users answered, by source.", ["source"]
)
COLD_USERS = Counter(
    names.COLD_USERS.removesuffix("_total"), "Users asked for that the served run does not know."
)
STORE_READ_SECONDS = Histogram(
    names.STORE_READ_SECONDS,
    "Online-store read latency.",
    ["operation"],
    buckets=names.LATENCY_BUCKETS,
)
FEEDBACK_EVENTS = Counter(
    names.FEEDBACK_EVENTS.removesuffix("_total"), "Feedback events, by outcome.", ["outcome"]
)
FEEDBACK_LIKES = Counter(
    names.FEEDBACK_LIKES.removesuffix("_total"),
    "Likes stored, by model version.",
    ["model_version"],
)
FEEDBACK_IMPRESSIONS = Counter(
    names.FEEDBACK_IMPRESSIONS.removesuffix("_total"),
    "Playlists shown in stored feedback events, by model version.",
    ["model_version"],
)
FEEDBACK_VIEWS = Counter(
    names.FEEDBACK_VIEWS.removesuffix("_total"),
    "Lists shown (view events stored), by model version.",
    ["model_version"],
)
EXPERIMENT_LIKE_RATE = Gauge(
    names.EXPERIMENT_LIKE_RATE,
    "The running experiment's like rate per version (users who liked / users shown a list), "
    "with its 95 % interval (bound: estimate, low, high).",
    ["experiment_id", "model_version", "role", "bound"],
)
EXPERIMENT_USERS_VIEWED = Gauge(
    names.EXPERIMENT_USERS_VIEWED,
    "Users shown a list in the running experiment, per version.",
    ["experiment_id", "model_version", "role"],
)
EXPERIMENT_DIFFERENCE = Gauge(
    names.EXPERIMENT_DIFFERENCE,
    "Challenger minus champion like rate, with its 95 % interval (bound: estimate, low, high).",
    ["experiment_id", "bound"],
)
EXPERIMENT_P_VALUE = Gauge(
    names.EXPERIMENT_P_VALUE,
    "Two-sided p-value of the two-proportion test of the running experiment.",
    ["experiment_id"],
)
EXPERIMENT_GAUGES = (
    EXPERIMENT_LIKE_RATE,
    EXPERIMENT_USERS_VIEWED,
    EXPERIMENT_DIFFERENCE,
    EXPERIMENT_P_VALUE,
)
CURRENT_RUN_AGE = Gauge(names.CURRENT_RUN_AGE, "Age of the served run (since it was published).")
SERVING_RUN = Info(names.SERVING_RUN, "The run and model version being served.")
RUN_REFRESH_FAILURES = Counter(
    names.RUN_REFRESH_FAILURES.removesuffix("_total"),
    "Failed reads of the current run; the last known run was served meanwhile.",
)


def initialise() -> None:
    """Create every labelled series at zero, so increase() sees the first event."""
    for source in ("batch", "fallback"):
        USERS_SERVED.labels(source)
    for outcome in ("stored", "duplicate", "failed"):
        FEEDBACK_EVENTS.labels(outcome)
    for operation in ("recommendations", "current_run", "names"):
        STORE_READ_SECONDS.labels(operation)


def record_experiment(report: dict[str, Any] | None) -> None:
    """Show a report (or none: no experiment runs) on /metrics, replacing the last one."""
    for gauge in EXPERIMENT_GAUGES:
        gauge.clear()
    if report is None:
        return
    experiment_id = report["experiment"]["experiment_id"]
    for row in report["versions"]:
        labels = (experiment_id, row["model_version"], row["role"])
        EXPERIMENT_USERS_VIEWED.labels(*labels).set(row["users_viewed"])
        for bound, key in (
            ("estimate", "like_rate"),
            ("low", "like_rate_low"),
            ("high", "like_rate_high"),
        ):
            if row[key] is not None:
                EXPERIMENT_LIKE_RATE.labels(*labels, bound).set(row[key])
    difference = report["difference"]
    if difference is not None:
        for bound, key in (
            ("estimate", "challenger_minus_champion"),
            ("low", "low"),
            ("high", "high"),
        ):
            EXPERIMENT_DIFFERENCE.labels(experiment_id, bound).set(difference[key])
        EXPERIMENT_P_VALUE.labels(experiment_id).set(difference["p_value"])
