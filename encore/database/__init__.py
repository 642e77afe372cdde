"""Database factories: Postgres if ENCORE_DATABASE_URL is set, else SQLite under ENCORE_HOME."""

from __future__ import annotations

from encore.database.base import (
    AsyncDatabase,
    Database,
    FeedbackConflict,
    FeedbackEvent,
    RunRecord,
    new_run_id,
)
from encore.settings import Settings

__all__ = [
    "AsyncDatabase",
    "Database",
    "FeedbackConflict",
    "FeedbackEvent",
    "RunRecord",
    "new_run_id",
    "open_async_database",
    "open_database",
]


def open_database(settings: Settings) -> Database:
    if settings.database_url:
        from encore.database.postgres import PostgresDatabase

        return PostgresDatabase(settings.database_url)
    from encore.database.sqlite import SQLiteDatabase

    return SQLiteDatabase(settings.sqlite_database_path)


def open_async_database(settings: Settings) -> AsyncDatabase:
    if settings.database_url:
        from encore.database.postgres_async import AsyncPostgresDatabase

        return AsyncPostgresDatabase(settings.database_url)
    from encore.database.sqlite import AsyncSQLiteDatabase

    return AsyncSQLiteDatabase(settings.sqlite_database_path)
