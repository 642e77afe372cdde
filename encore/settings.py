"""All of Encore's settings, read from the environment (prefix ``ENCORE_``) and ``.env``."""

from __future__ import annotations

import os
from datetime import time
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The engines that can score a run (scheduler/pool.py, scheduler/ray_engine.py).
ENGINES = ("local", "ray")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENCORE_", env_file=".env", extra="ignore")

    home: Path = Field(Path(".encore"), description="Data dir: bundles, pairings, SQLite files.")
    redis_url: str | None = Field(None, description="Online store; unset = SQLite under home.")
    redis_prefix: str = Field(
        "encore", min_length=1, description="Key prefix, so environments can share a Redis."
    )
    redis_cluster: bool = Field(
        False, description="ENCORE_REDIS_URL names a node of a Redis Cluster (any one)."
    )
    redis_buckets: int = Field(
        1024,
        ge=1,
        le=65536,
        description="Hashes a run's lists are spread over; each holds users/buckets of them.",
    )
    database_url: str | None = Field(
        None, description="Feedback and run records; unset = SQLite under home."
    )
    admin_token: SecretStr | None = Field(None, description="Bearer token for admin routes.")

    schedule_time: time = Field(time(2, 0), description="Nightly run time, HH:MM.")
    schedule_timezone: str = Field("UTC", description="IANA zone of schedule_time.")
    misfire_grace_seconds: int = Field(6 * 3600, ge=0)
    batch_size: int = Field(1000, ge=1, le=100_000, description="Users per scoring batch.")
    top_n: int = Field(20, ge=1, le=200, description="Playlists stored per user and run.")
    workers: int = Field(
        default_factory=lambda: max(1, os.cpu_count() or 1), ge=1, description="Scoring processes."
    )
    torch_threads: int = Field(1, ge=1, description="torch threads per scoring process.")
    batches_in_flight: int = Field(0, ge=0, description="0 = two per worker.")
    engine: str = Field(
        "local", description="What scores a run: local (a process pool) or ray (Ray Data)."
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join (an address or auto); unset = start a local Ray."
    )
    ray_actors: int = Field(0, ge=0, description="Ray scoring actors; 0 = one per CPU Ray reports.")
    ease_max_items: int = Field(
        12_000,
        ge=0,
        description="Playlists (held by 2+ users) above which training's item-item generator "
        "is item-KNN rather than EASE (a dense inverse of that size).",
    )
    interactions: Path | None = Field(
        None,
        description="Where the nightly run reads new interactions: a file, or a directory of "
        "partitions (CSV/TSV/Parquet with a header, e.g. one per day); unset = the nightly run "
        "scores the promoted model's pairings as they are.",
    )
    interactions_columns: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Column names of header-less partitions, comma-separated."
    )
    like_weight: float = Field(
        1.0, ge=0, description="Weight of a feedback-page like as an interaction; 0 = none."
    )
    refresh_mode: str = Field(
        "auto",
        pattern="^(auto|full)$",
        description="auto: a night pairs again only the users with new activity when they are "
        "few (ENCORE_INCREMENTAL_MAX_SHARE); full: every night rebuilds every pairing.",
    )
    incremental_max_share: float = Field(
        0.1, gt=0, le=1, description="Above this share of users changed, a refresh is full."
    )
    full_refresh_every_days: float = Field(
        7, ge=0, description="A full refresh at least this often (0 = every night)."
    )
    retrain_every_days: float = Field(
        0,
        ge=0,
        description="With ENCORE_INTERACTIONS: retrain the ranker when it is this old, behind "
        "the quality gate; 0 = never (the nightly refresh only).",
    )
    retrain_tolerance: float = Field(
        0.02,
        ge=0,
        lt=1,
        description="The gate: a retrained ranker is promoted unless its recall@10 on the "
        "latest data is below the champion's by more than this share.",
    )
    run_grace_seconds: int = Field(
        48 * 3600, ge=0, description="How long a replaced run stays readable (rollback window)."
    )
    pending_ttl_seconds: int = Field(
        6 * 3600,
        ge=60,
        description="An unpublished run's keyspace expires this long after its last write.",
    )
    store_retry_seconds: float = Field(
        60.0,
        ge=0,
        description="How long a run waits for Redis or the database to come back before it fails.",
    )
    queue_poll_seconds: float = Field(
        5.0, gt=0, description="How often the scheduler looks for runs queued through the API."
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    scheduler_metrics_port: int = Field(9101, ge=0, le=65535)
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated origins allowed by CORS."
    )
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted.")
    run_cache_seconds: float = Field(
        1.0, ge=0, description="How long the API reuses its view of the current run."
    )
    experiment_metrics_seconds: float = Field(
        60.0, gt=0, description="How often the API recomputes the experiment's report gauges."
    )

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_token_is_unset(cls, value: object) -> object:
        # ENCORE_ADMIN_TOKEN= (copied from .env.example) must not open the admin routes.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        if value not in ENGINES:
            raise ValueError(f"unknown engine {value!r}: choose one of {', '.join(ENGINES)}")
        return value

    @field_validator("interactions_columns", mode="before")
    @classmethod
    def _split_columns(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()] or None
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def bundles_dir(self) -> Path:
        return self.home / "bundles"

    @property
    def ingest_dir(self) -> Path:
        """What the nightly ingest has read so far (training/source.py documents the layout)."""
        return self.home / "state" / "ingest"

    @property
    def sqlite_online_path(self) -> Path:
        return self.home / "online.sqlite3"

    @property
    def sqlite_database_path(self) -> Path:
        return self.home / "encore.sqlite3"

    @property
    def resolved_batches_in_flight(self) -> int:
        return self.batches_in_flight or 2 * self.workers


@lru_cache
def get_settings() -> Settings:
    return Settings()
