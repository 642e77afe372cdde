"""The experiments' SQL, the same for Postgres and SQLite but for the parameter mark."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from encore.experiments import Experiment, VersionCounts

COLUMNS = "experiment_id, champion, challenger, share, started_at, ended_at, end_reason, offline"
INSERT = f"INSERT INTO experiments ({COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL, NULL, ?)"
CURRENT = f"SELECT {COLUMNS} FROM experiments WHERE ended_at IS NULL"
BY_ID = f"SELECT {COLUMNS} FROM experiments WHERE experiment_id = ?"
LAST = f"SELECT {COLUMNS} FROM experiments ORDER BY started_at DESC LIMIT 1"
END = "UPDATE experiments SET ended_at = ?, end_reason = ? WHERE experiment_id = ?"
# Per version and user first (did they view, did they like), then per version: a user is the
# unit of the like rate, as users are what the arms are drawn from.
COUNTS = """
WITH per_user AS (
    SELECT model_version, user_id,
           MAX(CASE WHEN kind = 'view' THEN 1 ELSE 0 END) AS viewed,
           MAX(CASE WHEN kind = 'like' THEN 1 ELSE 0 END) AS liked,
           SUM(CASE WHEN kind = 'view' THEN 1 ELSE 0 END) AS views,
           SUM(CASE WHEN kind = 'like' THEN 1 ELSE 0 END) AS likes
    FROM feedback
    WHERE experiment_id = ? AND model_version IS NOT NULL
    GROUP BY model_version, user_id
)
SELECT model_version, SUM(viewed) AS users_viewed, SUM(viewed * liked) AS users_liked,
       SUM(views) AS views, SUM(likes) AS likes
FROM per_user GROUP BY model_version ORDER BY model_version
"""


def sql(statement: str, dialect: str) -> str:
    return statement.replace("?", "%s") if dialect == "postgres" else statement


def insert_values(experiment: Experiment, dialect: str) -> tuple:
    offline: Any = json.dumps(experiment.offline)
    started: Any = experiment.started_at or datetime.now(UTC)
    if dialect == "postgres":
        from psycopg.types.json import Jsonb

        offline = Jsonb(experiment.offline)
    else:
        started = started.isoformat()
    return (
        experiment.experiment_id,
        experiment.champion,
        experiment.challenger,
        experiment.share,
        started,
        offline,
    )


def _values(row: Any) -> tuple:
    return tuple(row.values()) if isinstance(row, dict) else tuple(row)


def experiment_from_row(row: Any) -> Experiment:
    values = dict(zip(COLUMNS.split(", "), _values(row), strict=True))
    for name in ("started_at", "ended_at"):
        if isinstance(values[name], str):
            values[name] = datetime.fromisoformat(values[name])
    if isinstance(values["offline"], str):
        values["offline"] = json.loads(values["offline"])
    return Experiment(**values)


def counts_from_rows(rows: Any) -> list[VersionCounts]:
    counts = []
    for row in rows:
        version, *numbers = _values(row)
        counts.append(VersionCounts(version, *(int(n or 0) for n in numbers)))
    return counts


def fetch_experiment(conn: Any, dialect: str, experiment_id: str | None) -> Experiment | None:
    """By id; without one, the current experiment."""
    statement, params = (CURRENT, ()) if experiment_id is None else (BY_ID, (experiment_id,))
    return fetch_one(conn, dialect, statement, params)


def fetch_one(conn: Any, dialect: str, statement: str, params: tuple) -> Experiment | None:
    row = conn.execute(sql(statement, dialect), params).fetchone()
    return experiment_from_row(row) if row else None


def fetch_counts(conn: Any, dialect: str, experiment_id: str) -> list[VersionCounts]:
    return counts_from_rows(conn.execute(sql(COUNTS, dialect), (experiment_id,)).fetchall())
