"""`encore feedback export`: feedback events as Parquet, streamed in chunks."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from encore.database import open_database
from encore.settings import Settings

SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.int64()),
        ("run_id", pa.string()),
        ("model_version", pa.string()),
        ("liked_playlist_id", pa.int64()),  # null for a view
        ("shown_playlist_ids", pa.list_(pa.int64())),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("kind", pa.string()),  # like | view
        ("experiment_id", pa.string()),
    ]
)


def export_feedback(settings: Settings, since: datetime, out: Path) -> int:
    """Write events created at or after ``since`` to ``out``; return the number written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    rows = 0
    with open_database(settings) as db, pq.ParquetWriter(partial, SCHEMA) as writer:
        for chunk in db.feedback_since(since):
            writer.write_table(
                pa.Table.from_pydict(
                    {
                        "event_id": [str(e.event_id) for e in chunk],
                        "user_id": [e.user_id for e in chunk],
                        "run_id": [e.run_id for e in chunk],
                        "model_version": [e.model_version for e in chunk],
                        "liked_playlist_id": [e.liked_playlist_id for e in chunk],
                        "shown_playlist_ids": [list(e.shown_playlist_ids) for e in chunk],
                        "created_at": [e.created_at for e in chunk],
                        "kind": [e.kind for e in chunk],
                        "experiment_id": [e.experiment_id for e in chunk],
                    },
                    schema=SCHEMA,
                )
            )
            rows += len(chunk)
    os.replace(partial, out)  # readers never see a half-written file
    return rows
