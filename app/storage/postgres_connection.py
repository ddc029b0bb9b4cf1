"""Reaching PostgreSQL: which errors mean "away", and the schema applied at start-up."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from app.storage.base import StorageUnavailable
from app.storage.migrations import SCHEMA_VERSION, apply_postgres_schema

logger = logging.getLogger("app.storage")

# What a database that is away, restarting, full or read-only raises through asyncpg.
DATABASE_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
# What start-up waits out (the database is still booting, or not listening yet); any
# other error (a wrong password, a missing database) is a configuration error.
TRANSIENT_AT_START = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)
CONNECT_TIMEOUT_SECONDS = 5.0


def describe(exc: BaseException) -> str:
    """The error's type and SQLSTATE, never its message (it can quote row data)."""
    code = getattr(exc, "sqlstate", None)
    name = type(exc).__name__
    return f"{name} ({code})" if code else name


async def migrate(url: str, *, startup_timeout: float = 0.0) -> int:
    """Apply the schema, waiting up to `startup_timeout` for the database to accept us.

    Returns the version before. Used at start-up and by `python -m app init-db`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + startup_timeout
    delay = 0.25
    while True:
        try:
            conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_SECONDS)
            break
        except TRANSIENT_AT_START as exc:
            if loop.time() + delay > deadline:
                raise StorageUnavailable(f"database not reachable: {describe(exc)}") from None
            logger.warning("waiting for the database", extra={"error": describe(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        except DATABASE_ERRORS as exc:
            raise StorageUnavailable(f"cannot connect to the database: {describe(exc)}") from None
    try:
        before = await apply_postgres_schema(conn)
    except DATABASE_ERRORS as exc:
        raise StorageUnavailable(f"cannot apply the schema: {describe(exc)}") from None
    finally:
        await conn.close()
    if before > SCHEMA_VERSION:
        logger.warning(
            "database schema is newer than this build",
            extra={"schema_version": before, "expected": SCHEMA_VERSION},
        )
    return before
