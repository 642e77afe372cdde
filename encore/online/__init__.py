"""Online store factories: Redis if ENCORE_REDIS_URL is set, else SQLite under ENCORE_HOME."""

from __future__ import annotations

from encore.online.base import AsyncOnlineReader, OnlineStore, RunInfo, StoredRun, truncate
from encore.settings import Settings

__all__ = [
    "AsyncOnlineReader",
    "OnlineStore",
    "RunInfo",
    "StoredRun",
    "open_online_reader",
    "open_online_store",
    "truncate",
]


def open_online_store(settings: Settings) -> OnlineStore:
    if settings.redis_url:
        from encore.online.redis_store import RedisOnlineStore

        return RedisOnlineStore(
            settings.redis_url,
            prefix=settings.redis_prefix,
            pending_ttl_seconds=settings.pending_ttl_seconds,
            cluster=settings.redis_cluster,
            buckets=settings.redis_buckets,
        )
    from encore.online.sqlite_store import SQLiteOnlineStore

    return SQLiteOnlineStore(
        settings.sqlite_online_path, pending_ttl_seconds=settings.pending_ttl_seconds
    )


def open_online_reader(settings: Settings) -> AsyncOnlineReader:
    if settings.redis_url:
        from encore.online.redis_reader import AsyncRedisReader

        return AsyncRedisReader(
            settings.redis_url, prefix=settings.redis_prefix, cluster=settings.redis_cluster
        )
    from encore.online.sqlite_store import AsyncSQLiteReader

    return AsyncSQLiteReader(settings.sqlite_online_path)
