"""The data lifecycle on PostgreSQL: the statements, and the transactions that use them.

Why an erasure locks inserts out while it runs. An insert leaves out tombstoned ids with
`NOT EXISTS` in its own statement, under READ COMMITTED, and an erasure deletes the row
and writes its tombstone in one transaction. Without more, a redelivery whose statement
took its snapshot before the erasure committed, and found the row being deleted, waits for
the erasure, then sees the row gone and inserts it again: its NOT EXISTS looked at the old
snapshot. So every transaction that deletes messages and writes tombstones starts with
`LOCK TABLE tombstones IN ACCESS EXCLUSIVE MODE`. Every insert reads `tombstones`, so it
holds ACCESS SHARE on it until it commits: the lock waits for the inserts in flight (the
erasure then deletes what they stored), and inserts that arrive meanwhile wait for it.
PostgreSQL takes a statement's table locks before its snapshot, so those inserts see the
tombstones once they run. `tombstones`, not `messages`: every mode strong enough to hold
inserts back on `messages` would also stop (and cancel) autovacuum there, which a purge
needs most. Erasures and purges take turns; readers of messages are never held. Ingest
pauses for one transaction, one message or one batch, and never more than LOCK_TIMEOUT
(tests/test_lifecycle_postgres.py holds the race open, with a variant without the lock
that stores the row again).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import asyncpg

from app.models import ListQuery, StoredMessage
from app.storage.base import StorageUnavailable
from app.storage.lifecycle import (
    ERASE_BATCH,
    EXPORT_COLUMNS,
    EXPORT_PAGE,
    Erasure,
    ImportCounts,
    ImportRow,
    number_digest,
    stored_message,
    tombstone_hash,
)
from app.storage.postgres.connection import DATABASE_ERRORS, describe
from app.storage.postgres.sql import INSERT_MANY, binder, list_filters
from app.storage.rows import Clock, Row, format_instant, message_row

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection = PoolConnectionProxy[asyncpg.Record]

T = TypeVar("T")


class WithConnection(Protocol):
    """The store's way to run `fn` on a pooled connection within `timeout` seconds."""

    def __call__(
        self, fn: Callable[[Connection], Awaitable[T]], timeout: float
    ) -> Awaitable[T]: ...


# Waiting longer for the lock would hold every insert queued behind it that long: an
# erasure that cannot have it answers 503, a purge tries again next round.
LOCK_TIMEOUT = "2s"
# A number's erasure reads its candidates in one snapshot while it deletes them: bounded,
# but generously (each delete has the write timeout of its own).
NUMBER_TIMEOUT_SECONDS = 600.0
# Any constant will do, as long as nothing else in the database takes this advisory lock.
PURGE_LOCK = 0x5765_6268_6F6F_6B34  # "Webhook4"
# A permanent tombstone (expires_at NULL) stays permanent; of two expiring ones, the
# later expiry wins.
BURY = (
    "INSERT INTO tombstones (hash, created_at, expires_at)"
    " SELECT hash, $2, $3 FROM unnest($1::bytea[]) AS hash"
    " ON CONFLICT (hash) DO UPDATE SET expires_at = CASE"
    " WHEN tombstones.expires_at IS NULL OR excluded.expires_at IS NULL THEN NULL"
    " ELSE greatest(tombstones.expires_at, excluded.expires_at) END"
)
GET_MESSAGE = f"SELECT {EXPORT_COLUMNS} FROM messages WHERE message_id = $1"
IS_TOMBSTONED = "SELECT EXISTS (SELECT 1 FROM tombstones WHERE hash = $1)"
LOAD_KEY = "SELECT key FROM lifecycle_key WHERE id = 1"
# Who has a number, in one snapshot: the sender index, and one scan for the recipients.
NUMBER_CANDIDATES = "SELECT message_id FROM messages WHERE from_msisdn = $1 OR to_msisdn = $1"
DELETE_NUMBER_IDS = (
    "DELETE FROM messages WHERE message_id = ANY($1::text[])"
    " AND (from_msisdn = $2 OR to_msisdn = $2) RETURNING message_id"
)
ANY_DUE = 'SELECT EXISTS (SELECT 1 FROM messages WHERE created_at COLLATE "C" < $1)'
PURGE_OLDEST = (
    "DELETE FROM messages WHERE message_id IN (SELECT message_id FROM messages"
    ' WHERE created_at COLLATE "C" < $1 ORDER BY created_at COLLATE "C" LIMIT $2)'
    " RETURNING message_id"
)
EXPIRE_TOMBSTONES = (
    "DELETE FROM tombstones WHERE hash IN (SELECT hash FROM tombstones"
    ' WHERE expires_at IS NOT NULL AND expires_at COLLATE "C" <= $1 LIMIT $2)'
)
# A refused delivery's row names its message_id (a conflict): erased with the message.
FORGET_REJECTIONS = "DELETE FROM rejections WHERE message_id = ANY($1::text[])"
COUNT_TOMBSTONED = "SELECT count(*) FROM tombstones WHERE hash = ANY($1::bytea[])"


async def lock_out_inserts(conn: Connection) -> None:
    """In the caller's transaction: no insert runs, or starts, until it ends."""
    await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    await conn.execute("LOCK TABLE tombstones IN ACCESS EXCLUSIVE MODE")


async def bury(
    conn: Connection, key: bytes, ids: Sequence[str], now: str, expires: str | None
) -> int:
    await conn.execute(BURY, [tombstone_hash(key, i) for i in ids], now, expires)
    return len(ids)


async def erase_message(conn: Connection, key: bytes, message_id: str, now: str) -> int:
    """Delete one message and write its tombstone; 1 if it was there, else 0."""
    async with conn.transaction():
        await lock_out_inserts(conn)
        gone = await conn.fetchval(
            "DELETE FROM messages WHERE message_id = $1 RETURNING 1", message_id
        )
        if gone is None:
            return 0
        await bury(conn, key, [message_id], now, None)
        await conn.execute(FORGET_REJECTIONS, [message_id])
    return 1


async def erase_ids_of_number(
    conn: Connection, key: bytes, ids: Sequence[str], msisdn: str, now: str
) -> int:
    """Delete those of `ids` still from or to `msisdn`, and write their tombstones."""
    async with conn.transaction():
        await lock_out_inserts(conn)
        gone = [r[0] for r in await conn.fetch(DELETE_NUMBER_IDS, list(ids), msisdn)]
        await bury(conn, key, gone, now, None)
        await conn.execute(FORGET_REJECTIONS, gone)
    return len(gone)


async def purge_batch(
    conn: Connection,
    key: bytes,
    *,
    cutoff: str,
    now: str,
    expires: str | None,
    limit: int,
) -> int:
    """Delete up to `limit` of the oldest messages received before `cutoff`, each with a
    tombstone until `expires` (None: none). One replica at a time: 0 if another is at it
    (waiting for the table lock behind it would hold every insert back meanwhile)."""
    # Most rounds find nothing due: they must not lock inserts out for nothing.
    if not await conn.fetchval(ANY_DUE, cutoff):
        return 0
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", PURGE_LOCK):
            return 0
        await lock_out_inserts(conn)
        gone = [r[0] for r in await conn.fetch(PURGE_OLDEST, cutoff, limit)]
        if gone and expires is not None:
            await bury(conn, key, gone, now, expires)
    return len(gone)


async def import_batch(
    conn: Connection, key: bytes, rows: Sequence[tuple[Row, str]], durable: bool
) -> ImportCounts:
    # In message_id order, like the webhook's batches, so that concurrent batches sharing
    # ids take their index locks in one order.
    ordered = sorted(rows, key=lambda pair: str(pair[0][0]))
    hashes = [tombstone_hash(key, row[0]) for row, _ in ordered]
    columns = [list(column) for column in zip(*(row for row, _ in ordered), strict=True)]
    async with conn.transaction():
        if not durable:
            # The commit does not wait for the WAL flush; the next durable one's does,
            # and it covers everything committed before it.
            await conn.execute("SET LOCAL synchronous_commit = off")
        buried = int(await conn.fetchval(COUNT_TOMBSTONED, hashes))
        created = len(
            await conn.fetch(INSERT_MANY, *columns, hashes, [received for _, received in ordered])
        )
    return ImportCounts(created, len(rows) - created - buried, buried)


def export_page(
    query: ListQuery, after: tuple[str, str] | None = None, limit: int | None = None
) -> tuple[str, list[Any]]:
    """The statement of an export page (or, without a limit, of the whole export):
    EXPORT_COLUMNS then ts_key, in listing order."""
    args: list[Any] = []
    arg = binder(args)
    clauses = list_filters(query, arg)
    if after is not None:
        clauses.append(f"(ts_key, message_id) > ({arg(after[0])}, {arg(after[1])})")
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"SELECT {EXPORT_COLUMNS}, ts_key FROM messages{where} ORDER BY ts_key, message_id"
    if limit is not None:
        sql += f" LIMIT {arg(limit)}"
    return sql, args


async def load_key(pool: asyncpg.Pool) -> bytes:
    """The key tombstones are hashed with (made by the schema)."""
    try:
        key: bytes = await pool.fetchval(LOAD_KEY)
    except DATABASE_ERRORS as exc:
        raise StorageUnavailable(f"cannot read the lifecycle key: {describe(exc)}") from None
    return key


class PostgresLifecycle:
    """The store's lifecycle operations (MessageStore.lifecycle) on PostgreSQL."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        with_connection: WithConnection,
        *,
        key: bytes,
        clock: Clock,
        write_timeout: float,
        read_timeout: float,
        on_import: Callable[[], None],
    ) -> None:
        self._pool = pool
        self._run = with_connection
        # Imported rows are feed rows too: their commit wakes the feed's readers.
        self._on_import = on_import
        self._key = key
        self._clock = clock
        self._write_timeout = write_timeout
        self._read_timeout = read_timeout

    async def get_message(self, message_id: str) -> StoredMessage | None:
        async def run(conn: Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(GET_MESSAGE, message_id)

        row = await self._run(run, self._read_timeout)
        return None if row is None else stored_message(tuple(row))

    async def is_tombstoned(self, message_id: str) -> bool:
        async def run(conn: Connection) -> bool:
            return bool(await conn.fetchval(IS_TOMBSTONED, tombstone_hash(self._key, message_id)))

        return await self._run(run, self._read_timeout)

    async def erase_message(self, message_id: str) -> Erasure:
        key, now = self._key, self._now()

        async def run(conn: Connection) -> int:
            return await erase_message(conn, key, message_id, now)

        deleted = await self._run(run, self._write_timeout)
        return Erasure(tombstone_hash(key, message_id).hex(), deleted, deleted)

    async def erase_number(self, msisdn: str) -> Erasure:
        # The candidates come from one snapshot, read as they are erased, ERASE_BATCH at a
        # time on a second connection: each delete is a short transaction of its own.
        key, now, deleted = self._key, self._now(), 0

        async def erase(ids: list[str]) -> int:
            async def run(conn: Connection) -> int:
                return await erase_ids_of_number(conn, key, ids, msisdn, now)

            return await self._run(run, self._write_timeout)

        try:
            async with (
                asyncio.timeout(NUMBER_TIMEOUT_SECONDS),
                self._pool.acquire() as reader,
                reader.transaction(isolation="repeatable_read", readonly=True),
            ):
                ids: list[str] = []
                async for record in reader.cursor(NUMBER_CANDIDATES, msisdn, prefetch=ERASE_BATCH):
                    ids.append(record[0])
                    if len(ids) == ERASE_BATCH:
                        deleted += await erase(ids)
                        ids = []
                if ids:
                    deleted += await erase(ids)
        except DATABASE_ERRORS as exc:
            raise StorageUnavailable(describe(exc)) from None
        return Erasure(number_digest(key, msisdn), deleted, deleted)

    async def purge(self, older_than: timedelta, tombstone_for: timedelta, limit: int) -> int:
        moment = self._clock()
        cutoff, now = format_instant(moment - older_than), format_instant(moment)
        expires = format_instant(moment + tombstone_for) if tombstone_for else None

        async def run(conn: Connection) -> int:
            return await purge_batch(
                conn, self._key, cutoff=cutoff, now=now, expires=expires, limit=limit
            )

        return await self._run(run, self._write_timeout)

    async def expire_tombstones(self, limit: int) -> int:
        now = self._now()

        async def run(conn: Connection) -> int:
            status = await conn.execute(EXPIRE_TOMBSTONES, now, limit)
            return int(status.rsplit(" ", 1)[1])

        return await self._run(run, self._write_timeout)

    async def export(self, query: ListQuery) -> AsyncIterator[list[Row]]:
        # Page by page, each page its own statement: no snapshot is held between pages.
        after: tuple[str, str] | None = None
        while True:
            sql, args = export_page(query, after, EXPORT_PAGE)

            async def run(conn: Connection, sql: str = sql, args: list[Any] = args) -> list[Row]:
                return [tuple(record) for record in await conn.fetch(sql, *args)]

            rows = await self._run(run, self._read_timeout)
            if rows:
                yield [row[:-1] for row in rows]
            if len(rows) < EXPORT_PAGE:
                return
            after = (rows[-1][-1], rows[-1][0])

    async def import_rows(self, rows: Sequence[ImportRow], *, durable: bool = True) -> ImportCounts:
        now = self._now()
        prepared = [(message_row(message), received or now) for message, received in rows]

        async def run(conn: Connection) -> ImportCounts:
            return await import_batch(conn, self._key, prepared, durable)

        counts = await self._run(run, self._write_timeout)
        if counts.created:
            self._on_import()
        return counts

    def _now(self) -> str:
        return format_instant(self._clock())
