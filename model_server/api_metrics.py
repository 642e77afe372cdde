"""The model server's own Prometheus metrics (names in encore.metric_names)."""

from __future__ import annotations

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
