"""Message stores: the interface, its two backends, and the one place that picks one.

`app.storage` is the import path the brief names; the interface lives in `base`, each
backend in its own modules (sqlite*, postgres*), the schema in `schema/` and `migrations`.
"""

from __future__ import annotations

from app.config import Settings
from app.storage.base import Lifecycle, MessageStore, QueryTooExpensive, StorageUnavailable
from app.storage.postgres.store import PostgresStore
from app.storage.rows import Clock, system_clock
from app.storage.sqlite.store import SQLiteStore

__all__ = [
    "Lifecycle",
    "MessageStore",
    "PostgresStore",
    "QueryTooExpensive",
    "SQLiteStore",
    "StorageUnavailable",
    "open_store",
]


async def open_store(settings: Settings, *, clock: Clock = system_clock) -> MessageStore:
    """The store DATABASE_URL names, opened (schema applied) and ready to serve.

    `clock` stamps received_at and dates retention and tombstones (tests move it).
    """
    database = settings.database
    if database.scheme == "sqlite":
        return await SQLiteStore.open(
            database.target,
            busy_timeout_ms=settings.sqlite_busy_timeout_ms,
            write_timeout=settings.write_timeout_seconds,
            read_timeout=settings.read_timeout_seconds,
            max_scans=settings.max_concurrent_scans,
            clock=clock,
        )
    return await PostgresStore.open(
        database.target,
        pool_size=settings.database_pool_size,
        read_pool_size=settings.read_pool_size,
        write_timeout=settings.write_timeout_seconds,
        read_timeout=settings.read_timeout_seconds,
        max_scans=settings.max_concurrent_scans,
        startup_timeout=settings.database_startup_timeout_seconds,
        clock=clock,
        direct_url=settings.direct_database_url,
        pooled=settings.database_pooler != "none",
    )
