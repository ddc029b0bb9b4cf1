"""The message store on PostgreSQL, for several API replicas on one database.

The same schema and answers as the SQLite store (app/storage/schema/postgres/
mirrors app/storage/schema/sqlite/), on asyncpg:

- Inserts are grouped as with SQLite: while a few statements are in flight, requests
  queue up, and the next statement takes every row waiting by then, as one
  `INSERT ... SELECT FROM unnest(...) ON CONFLICT (message_id) DO NOTHING RETURNING
  message_id`, committed with synchronous_commit on. The returned ids are the new ones:
  never a read first, so concurrent deliveries on any replicas store one row and report
  one `created`.
- /stats aggregates are kept without a hot row: an insert appends a delta, a background
  task folds the deltas into per-sender and total counts (one replica at a time), and a
  read adds the pending deltas to the folded counts in one snapshot (see the schema).
- Each read is one statement (one snapshot): the page and its `total` always agree.
- Reads, writes and readiness checks each have a pool of their own, so that slow reads
  never hold a connection a webhook or a probe needs. Reads run with statement_timeout
  at the read deadline, without parallel workers (one core per read at most), and at
  most `max_scans` of those that scan (see `is_scan`) at once; a read stopped at its
  deadline is QueryTooExpensive. A cancelled read (its client went away) is cancelled
  on the server too: asyncpg sends a cancel request.
- When the database goes away, calls fail fast with StorageUnavailable (a 503 with
  Retry-After); the pool replaces broken connections as they are next used, so the
  service recovers by itself when the database comes back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg

from app.models import FeedQuery, ListQuery, Message, MessagePage, Stats
from app.records import ConversationPage, Refusal, RejectionPage, StoredContent, TimelineRange
from app.storage.base import StorageUnavailable, is_scan
from app.storage.feed import FeedBatch, FeedSignal
from app.storage.lifecycle import tombstone_hash
from app.storage.migrations import SCHEMA_VERSION
from app.storage.postgres import console as console
from app.storage.postgres import reads as reads
from app.storage.postgres.budget import store_budget
from app.storage.postgres.connection import (
    DATABASE_ERRORS,
    bounded_read,
    describe,
    migrate,
    open_pools,
    read_preamble,
)
from app.storage.postgres.feed import FeedChannel
from app.storage.postgres.lifecycle import PostgresLifecycle, load_key
from app.storage.postgres.sql import HAS_TRIGRAM_INDEX, INSERT_MANY, MAX_BATCH
from app.storage.rows import Clock, Row, format_instant, message_row, system_clock
from app.tasks import cancel_and_wait

# migrate is imported from here by the CLI and the tests.
__all__ = ["PostgresStore", "RowRejected", "migrate"]

logger = logging.getLogger("app.storage")

T = TypeVar("T")

if TYPE_CHECKING:
    from app.storage.postgres.reads import Connection

# What a row itself can cause (a value or a constraint the database refuses): that row
# fails, the others in its batch are retried without it.
ROW_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)
FOLD_INTERVAL_SECONDS = 1.0
CLOSE_TIMEOUT_SECONDS = 10.0


class RowRejected(Exception):
    """The database refused something about the rows, not the connection."""


class PostgresStore:
    """MessageStore on PostgreSQL. Build it with `await PostgresStore.open(url, ...)`."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        read_pool: asyncpg.Pool,
        probe_pool: asyncpg.Pool,
        write_timeout: float,
        read_timeout: float,
        key: bytes,
        clock: Clock,
        max_scans: int = 2,
        trigram_index: bool = True,
        read_preamble: str | None = None,
    ) -> None:
        self._pool = pool
        self._read_preamble = read_preamble
        self._read_pool = read_pool
        self._probe_pool = probe_pool
        self._key = key
        self._clock = clock
        self.lifecycle = PostgresLifecycle(
            pool,
            self._with_connection,
            key=key,
            clock=clock,
            write_timeout=write_timeout,
            read_timeout=read_timeout,
            on_import=self._announce,
        )
        self.feed_signal = FeedSignal()
        # Its own connection, beside the pools: LISTEN for the other replicas' commits and
        # NOTIFY them of ours (app/storage/postgres/feed.py). Set by open().
        self._feed_channel: FeedChannel | None = None
        self._write_timeout = write_timeout
        self._read_timeout = read_timeout
        self._scan_slots = asyncio.Semaphore(max_scans)
        # Without pg_trgm every `q` is a scan.
        self._trigram_index = trigram_index
        # False after a failed write, True after a good one: readiness reads it.
        self._healthy = True
        self._folder: asyncio.Task[None] | None = None
        self._waiting: list[tuple[Row, asyncio.Future[bool]]] = []
        self._flushers: set[asyncio.Task[None]] = set()
        self._max_flushers = max(1, pool.get_max_size() // 2)
        # Counted by the flushers themselves, not by their tasks' done-callbacks (which
        # run a step later): a row queued just as the last flusher quits must start another.
        self._active_flushers = 0

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        pool_size: int = 10,
        read_pool_size: int = 3,
        write_timeout: float = 5.0,
        read_timeout: float = 5.0,
        max_scans: int = 2,
        startup_timeout: float = 30.0,
        fold_interval: float = FOLD_INTERVAL_SECONDS,
        clock: Clock = system_clock,
        direct_url: str | None = None,
        pooled: bool = False,
    ) -> PostgresStore:
        """`pooled`: `url` is a transaction-mode pooler (PgBouncer); then `direct_url`,
        PostgreSQL itself, serves what needs a session: migrations and LISTEN."""
        direct_url = direct_url or url
        budget = store_budget(pool_size, pooled=pooled)
        await migrate(direct_url, startup_timeout=startup_timeout, budget=budget)
        pool, read_pool, probe_pool = await open_pools(
            url,
            pool_size=pool_size,
            read_pool_size=read_pool_size,
            read_timeout=read_timeout,
            pooled=pooled,
        )
        try:
            trigram_index = bool(await read_pool.fetchval(HAS_TRIGRAM_INDEX))
            key = await load_key(pool)
            store = cls(
                pool,
                read_pool=read_pool,
                probe_pool=probe_pool,
                write_timeout=write_timeout,
                read_timeout=read_timeout,
                key=key,
                clock=clock,
                max_scans=max_scans,
                trigram_index=trigram_index,
                read_preamble=read_preamble(read_timeout) if pooled else None,
            )
            store._feed_channel = await FeedChannel.open(direct_url, store.feed_signal)
        except BaseException:
            for opened in (pool, read_pool, probe_pool):
                opened.terminate()
            raise
        store._folder = asyncio.create_task(
            store._fold_forever(fold_interval), name="fold-message-counts"
        )
        return store

    async def insert(self, message: Message) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((message_row(message), future))
        if self._active_flushers < self._max_flushers:
            self._active_flushers += 1
            flusher = asyncio.create_task(self._flush())
            self._flushers.add(flusher)
            flusher.add_done_callback(self._flushers.discard)
        try:
            return await asyncio.wait_for(future, self._write_timeout)
        except TimeoutError:
            # The row may still commit later; the sender's retry is then a duplicate.
            raise StorageUnavailable("write timed out") from None

    async def insert_many(self, messages: Sequence[Message]) -> list[bool | StorageUnavailable]:
        if not messages:
            return []
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[bool]] = [loop.create_future() for _ in messages]
        self._waiting.extend(
            (message_row(message), future)
            for message, future in zip(messages, futures, strict=True)
        )
        while self._waiting and self._active_flushers < self._max_flushers:
            self._active_flushers += 1
            flusher = asyncio.create_task(self._flush())
            self._flushers.add(flusher)
            flusher.add_done_callback(self._flushers.discard)
        await asyncio.wait(futures, timeout=self._write_timeout)
        outcomes: list[bool | StorageUnavailable] = []
        for future in futures:
            if not future.done():
                # The rows may still commit later; a retry then finds them stored.
                future.cancel()
                outcomes.append(StorageUnavailable("write timed out"))
            elif (error := future.exception()) is None or isinstance(error, StorageUnavailable):
                outcomes.append(error or future.result())
            else:
                raise error
        return outcomes

    async def _flush(self) -> None:
        # Group commit: while up to _max_flushers statements are in flight, requests
        # queue up, and the next statement takes every row waiting by then.
        try:
            while self._waiting:
                batch = self._waiting[:MAX_BATCH]
                del self._waiting[:MAX_BATCH]
                await self._commit(batch)
        finally:
            self._active_flushers -= 1

    async def _commit(self, batch: list[tuple[Row, asyncio.Future[bool]]]) -> None:
        now = format_instant(self._clock())
        # Rows in message_id order: two batches holding the same ids (one delivery sent
        # to two replicas) then take their index locks in the same order, and wait for
        # each other instead of deadlocking.
        rows = sorted((row for row, _ in batch), key=lambda row: str(row[0]))
        columns = [list(column) for column in zip(*rows, strict=True)]
        hashes = [tombstone_hash(self._key, row[0]) for row in rows]

        async def run(conn: Connection) -> set[str]:
            try:
                records = await self._insert_rows(conn, columns, hashes, now)
            except ROW_ERRORS as exc:
                raise RowRejected(describe(exc)) from None
            return {record[0] for record in records}

        try:
            created = await self._with_connection(run, self._write_timeout)
        except StorageUnavailable as exc:
            # Away, full, read-only: the database, not the rows. Fail them all.
            self._healthy = False
            _fail(batch, exc)
            return
        except Exception:
            if len(batch) > 1:
                # Something about one row (it should not happen: rows are validated).
                # Retry one by one so that a single bad row fails alone.
                for one in batch:
                    await self._commit([one])
                return
            logger.exception("insert failed")
            _fail(batch, StorageUnavailable("insert failed"))
            return
        self._healthy = True
        if created:
            self._announce()
        for row, future in batch:
            # Only the first delivery of an id in this batch reports it as new.
            new = row[0] in created
            created.discard(row[0])
            if not future.done():
                future.set_result(new)

    async def _insert_rows(
        self, conn: Connection, columns: list[list[Any]], hashes: list[bytes], now: str
    ) -> list[asyncpg.Record]:
        # One autocommit statement, hence one INSERT per transaction: the feed positions
        # rely on it (app/storage/postgres/sql.py).
        return list(await conn.fetch(INSERT_MANY, *columns, hashes, [now] * len(hashes)))

    def _announce(self) -> None:
        """Rows were committed: wake this replica's feed readers and the others'."""
        if self._feed_channel is not None:
            self._feed_channel.committed()

    async def read_feed(self, query: FeedQuery) -> FeedBatch:
        return await self._read(lambda conn: reads.read_feed(conn, query))

    async def feed_head(self) -> int:
        return await self._read(reads.read_head)

    async def list_messages(self, query: ListQuery) -> MessagePage:
        scan = is_scan(query) or (query.q is not None and not self._trigram_index)
        return await self._read(lambda conn: reads.list_page(conn, query), scan=scan)

    async def stats(self) -> Stats:
        return await self._read(reads.read_stats)

    async def conversations(self, limit: int, after: tuple[str, str] | None) -> ConversationPage:
        return await self._read(lambda conn: console.conversations_page(conn, limit, after))

    async def timeline(self, span: TimelineRange) -> dict[str, int]:
        return await self._read(lambda conn: console.timeline_counts(conn, span))

    async def rejections(self, limit: int, before: int | None) -> RejectionPage:
        return await self._read(lambda conn: console.rejections_page(conn, limit, before))

    async def record_rejections(self, refusals: Sequence[Refusal], keep: int) -> None:
        await self._with_connection(
            lambda conn: console.write_rejections(conn, refusals, keep), self._write_timeout
        )

    async def stored_contents(self, ids: Sequence[str]) -> dict[str, StoredContent]:
        return await self._read(lambda conn: console.stored_contents(conn, ids))

    async def ping(self) -> None:
        # After a failed write, only a write proves that writes work again.
        version = await self._with_connection(
            lambda conn: reads.check_schema(conn, write=not self._healthy),
            self._write_timeout,
            self._probe_pool,
        )
        if version != SCHEMA_VERSION:
            raise StorageUnavailable(f"schema version is {version}, expected {SCHEMA_VERSION}")
        self._healthy = True

    async def fold(self) -> int:
        """Fold pending count deltas now; -1 if another process is folding."""

        async def run(conn: Connection) -> int:
            return int(await conn.fetchval("SELECT fold_message_counts()"))

        return await self._with_connection(run, self._write_timeout)

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run one read-only statement (diagnostics and tests; not part of the API)."""
        return await self._read(lambda conn: reads.read_only_query(conn, sql, params))

    async def close(self) -> None:
        if self._flushers:
            await asyncio.wait(self._flushers, timeout=self._write_timeout)
        if self._feed_channel is not None:
            await self._feed_channel.close()
        if self._folder is not None:
            await cancel_and_wait(self._folder)
        for pool in (self._read_pool, self._probe_pool, self._pool):
            try:
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_SECONDS)
            except TimeoutError:
                pool.terminate()

    async def _with_connection(
        self,
        fn: Callable[[Connection], Awaitable[T]],
        timeout: float,
        pool: asyncpg.Pool | None = None,
    ) -> T:
        # One deadline for waiting on the pool, (re)connecting and the statement: a
        # database that does not answer costs a request `timeout`, then a 503.
        try:
            async with asyncio.timeout(timeout), (pool or self._pool).acquire() as conn:
                return await fn(conn)
        except DATABASE_ERRORS as exc:
            # The caller logs the reason along with what it was doing.
            raise StorageUnavailable(describe(exc)) from None

    async def _read(self, fn: Callable[[Connection], Awaitable[T]], *, scan: bool = False) -> T:
        slots = self._scan_slots if scan else None
        return await bounded_read(
            self._read_pool, fn, self._read_timeout, slots, self._read_preamble
        )

    async def _fold_forever(self, interval: float) -> None:
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                await self.fold()
            except StorageUnavailable as exc:
                if not failing:
                    logger.warning("cannot fold counts", extra={"reason": str(exc)})
                failing = True
                continue
            if failing:
                logger.info("folding counts again")
                failing = False


def _fail(batch: list[tuple[Row, asyncio.Future[bool]]], error: StorageUnavailable) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(error)
