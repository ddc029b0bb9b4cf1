"""Reaching PostgreSQL: the schema at start-up, the store's pools, what errors mean."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

from app.storage.base import QueryTooExpensive, StorageUnavailable
from app.storage.migrations import SCHEMA_VERSION, apply_postgres_schema
from app.storage.postgres.budget import check_connection_budget

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
# What no retry cures: a certificate refused, a parameter asyncpg does not accept.
# Checked before TRANSIENT_AT_START, which the first would otherwise match (an OSError).
SETUP_ERRORS = (ssl.SSLCertVerificationError, asyncpg.ClientConfigurationError)
# The files a URL may name for TLS; checked before connecting, since a missing one is an
# OSError like a server that is not up yet.
TLS_FILES = ("sslrootcert", "sslcert", "sslkey", "sslcrl")
CONNECT_TIMEOUT_SECONDS = 5.0
# Behind a transaction-mode pooler a connection is a different server session from one
# transaction to the next: no statement cache (asyncpg would reuse statements prepared on
# another session), and the session settings are set in each read transaction instead.
POOLED_STATEMENT_CACHE_SIZE = 0

T = TypeVar("T")


def describe(exc: BaseException) -> str:
    """The error's type and SQLSTATE, never its message (it can quote row data)."""
    code = getattr(exc, "sqlstate", None)
    name = type(exc).__name__
    return f"{name} ({code})" if code else name


def describe_connect(exc: BaseException, url: str) -> str:
    """describe(), and for a setup error (SETUP_ERRORS) what to fix; never the password."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = f"the server's certificate was refused ({exc.verify_message})"
    elif isinstance(exc, asyncpg.ClientConfigurationError):
        reason = str(exc)
    else:
        return describe(exc)
    password = urlsplit(url).password
    for secret in {password, unquote(password)} if password else ():
        reason = reason.replace(secret, "***")
    return f"{describe(exc)}: {reason}"


def unreadable_tls_file(url: str) -> str | None:
    """What is wrong with the first TLS file the URL names that cannot be read, if any."""
    for name, values in parse_qs(urlsplit(url).query).items():
        for path in values if name in TLS_FILES else ():
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                return f"{name}={path} in the URL is not a readable file"
    return None


def read_settings(read_timeout: float) -> dict[str, str]:
    """The read sessions': read-only, stopped by the server at the read deadline, without
    parallel workers (a read uses one core at most)."""
    return {
        "default_transaction_read_only": "on",
        # Milliseconds; 0 would mean no limit.
        "statement_timeout": str(max(1, round(read_timeout * 1000))),
        "max_parallel_workers_per_gather": "0",
    }


def read_preamble(read_timeout: float) -> str:
    """read_settings() for one transaction: what a pooled read runs after BEGIN READ ONLY."""
    settings = read_settings(read_timeout)
    del settings["default_transaction_read_only"]
    return "; ".join(f"SET LOCAL {name} = {value}" for name, value in settings.items())


async def open_pools(
    url: str, *, pool_size: int, read_pool_size: int, read_timeout: float, pooled: bool = False
) -> tuple[asyncpg.Pool, asyncpg.Pool, asyncpg.Pool]:
    """(writes, reads, probes): separate pools, so that no kind waits behind another.

    `pool_size` connections in all: one for readiness probes, `read_pool_size` for reads,
    the rest for writes. Sessions for writes commit synchronously whatever the server's
    default; sessions for reads have read_settings(). `pooled`: `url` is a
    transaction-mode pooler, which forwards none of those settings; the reads run
    read_preamble() instead, and writes need the server's synchronous_commit on (checked).
    """
    write_pool_size = pool_size - read_pool_size - 1
    if write_pool_size < 1:
        raise ValueError(f"a pool of {pool_size} leaves no connection for writes")
    writes = {"synchronous_commit": "on", "application_name": "webhook-receiver"}
    reads = {"application_name": "webhook-receiver-reads", **read_settings(read_timeout)}
    options: dict[str, Any] = {}
    if pooled:
        writes = {"application_name": writes["application_name"]}
        reads = {"application_name": reads["application_name"]}
        options["statement_cache_size"] = POOLED_STATEMENT_CACHE_SIZE
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
                    **options,
                )
            )
        if pooled and await pools[0].fetchval("SHOW synchronous_commit") == "off":
            raise StorageUnavailable(
                "synchronous_commit is off for this role or database: through a pooler"
                " (DATABASE_POOLER) it cannot be set per session, so a commit could be"
                " acknowledged before it is durable; ALTER ROLE ... SET synchronous_commit = on"
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
    preamble: str | None = None,
) -> T:
    """`fn` on a connection of the read pool, within `timeout`; a scan (`scan_slots`
    given) waits for a slot first, within the same deadline.

    Past the deadline while waiting for a slot or running: QueryTooExpensive (the server
    stops a statement at its statement_timeout; a cancelled one gets a cancel request).
    Past it while waiting for a connection (the database does not answer):
    StorageUnavailable. `preamble`: the read runs in a read-only transaction that
    starts with it (read_preamble(), behind a pooler).
    """
    phase = "slot"
    try:
        async with asyncio.timeout(timeout):
            async with scan_slots if scan_slots is not None else contextlib.nullcontext():
                phase = "connection"
                async with pool.acquire() as conn:
                    phase = "statement"
                    if preamble is None:
                        return await fn(conn)
                    async with conn.transaction(readonly=True):
                        await conn.execute(preamble)
                        return await fn(conn)
    except asyncpg.QueryCanceledError:
        raise QueryTooExpensive(f"read stopped at its {timeout:g} s deadline") from None
    except TimeoutError:
        if phase == "connection":
            raise StorageUnavailable("no read connection within the read deadline") from None
        raise QueryTooExpensive(f"read stopped at its {timeout:g} s deadline ({phase})") from None
    except DATABASE_ERRORS as exc:
        raise StorageUnavailable(describe(exc)) from None


async def migrate(
    url: str, *, startup_timeout: float = 0.0, budget: tuple[int, str] | None = None
) -> int:
    """Apply the schema, waiting up to `startup_timeout` for the database to accept us.

    Returns the version before. Used at start-up and by `python -m app init-db`.
    `budget`: (connections, what they are) this process will hold; refused first if the
    server cannot give them (app/storage/postgres/budget.py).
    """
    if (problem := unreadable_tls_file(url)) is not None:
        raise StorageUnavailable(f"cannot connect to the database: {problem}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + startup_timeout
    delay = 0.25
    while True:
        try:
            conn = await asyncpg.connect(
                url,
                timeout=CONNECT_TIMEOUT_SECONDS,
                server_settings={"application_name": "webhook-receiver-migrate"},
            )
            break
        except SETUP_ERRORS as exc:
            raise StorageUnavailable(
                f"cannot connect to the database: {describe_connect(exc, url)}"
            ) from None
        except TRANSIENT_AT_START as exc:
            if loop.time() + delay > deadline:
                raise StorageUnavailable(f"database not reachable: {describe(exc)}") from None
            logger.warning("waiting for the database", extra={"error": describe(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        except DATABASE_ERRORS as exc:
            raise StorageUnavailable(f"cannot connect to the database: {describe(exc)}") from None
    try:
        if budget is not None:
            await check_connection_budget(conn, *budget)
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
