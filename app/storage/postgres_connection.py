"""Reaching PostgreSQL: the schema at start-up, the store's pools, what errors mean."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from app.storage.base import QueryTooExpensive, StorageUnavailable
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

T = TypeVar("T")


def describe(exc: BaseException) -> str:
    """The error's type and SQLSTATE, never its message (it can quote row data)."""
    code = getattr(exc, "sqlstate", None)
    name = type(exc).__name__
    return f"{name} ({code})" if code else name


async def open_pools(
    url: str, *, pool_size: int, read_pool_size: int, read_timeout: float
) -> tuple[asyncpg.Pool, asyncpg.Pool, asyncpg.Pool]:
    """(writes, reads, probes): separate pools, so that no kind waits behind another.

    `pool_size` connections in all: one for readiness probes, `read_pool_size` for reads,
    the rest for writes. Sessions for writes commit synchronously whatever the server's
    default; sessions for reads are read-only, stopped by the server at the read
    deadline, and without parallel workers (a read uses one core at most).
    """
    write_pool_size = pool_size - read_pool_size - 1
    if write_pool_size < 1:
        raise ValueError(f"a pool of {pool_size} leaves no connection for writes")
    writes = {"synchronous_commit": "on", "application_name": "webhook-receiver"}
    reads = {
        "application_name": "webhook-receiver-reads",
        "default_transaction_read_only": "on",
        # Milliseconds; 0 would mean no limit.
        "statement_timeout": str(max(1, round(read_timeout * 1000))),
        "max_parallel_workers_per_gather": "0",
    }
    pools: list[asyncpg.Pool] = []
    try:
        for size, settings in ((write_pool_size, writes), (read_pool_size, reads), (1, writes)):
            pools.append(
                await asyncpg.create_pool(
                    url,
                    min_size=1,
                    max_size=size,
                    timeout=CONNECT_TIMEOUT_SECONDS,
                    server_settings=settings,
                )
            )
    except BaseException:
        for pool in pools:
            pool.terminate()
        raise
    writes_pool, reads_pool, probes_pool = pools
    return writes_pool, reads_pool, probes_pool


async def bounded_read(
    pool: asyncpg.Pool,
    fn: Callable[[Any], Awaitable[T]],
    timeout: float,
    scan_slots: asyncio.Semaphore | None = None,
) -> T:
    """`fn` on a connection of the read pool, within `timeout`; a scan (`scan_slots`
    given) waits for a slot first, within the same deadline.

    Past the deadline while waiting for a slot or running: QueryTooExpensive (the server
    stops a statement at its statement_timeout; a cancelled one gets a cancel request).
    Past it while waiting for a connection (the database does not answer):
    StorageUnavailable.
    """
    phase = "slot"
    try:
        async with asyncio.timeout(timeout):
            async with scan_slots if scan_slots is not None else contextlib.nullcontext():
                phase = "connection"
                async with pool.acquire() as conn:
                    phase = "statement"
                    return await fn(conn)
    except asyncpg.QueryCanceledError:
        raise QueryTooExpensive(f"read stopped at its {timeout:g} s deadline") from None
    except TimeoutError:
        if phase == "connection":
            raise StorageUnavailable("no read connection within the read deadline") from None
        raise QueryTooExpensive(f"read stopped at its {timeout:g} s deadline ({phase})") from None
    except DATABASE_ERRORS as exc:
        raise StorageUnavailable(describe(exc)) from None


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
