"""The message store on SQLite.

- One writer connection, owned by one thread, commits queued inserts in groups
  (app/storage/sqlite/writer.py).
- WAL with synchronous=FULL: a commit returns only once the log is fsync'd, so a `200`
  survives power loss, not only a process crash. Checkpoints run in their own thread
  (app/storage/sqlite/checkpoint.py).
- Reads run on reader connections of their own (WAL lets them proceed during a write),
  each with a deadline at which it is interrupted (app/storage/sqlite/readers.py). Reads
  that scan (see `is_scan`) have their own few threads, at a lower CPU priority, so that
  at most `max_scans` run at once and indexed reads never queue behind them; readiness
  checks have a thread and connection of their own too.
- Idempotency is the primary key: INSERT ... ON CONFLICT DO NOTHING, never a read first.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from app.models import FeedQuery, ListQuery, Message, MessagePage, Stats
from app.records import (
    KEY_LENGTH,
    ConversationPage,
    Refusal,
    RejectionPage,
    StoredContent,
    TimelineRange,
)
from app.storage.base import QueryTooExpensive, StorageUnavailable, is_scan
from app.storage.feed import FeedBatch, FeedSignal
from app.storage.migrations import apply_sqlite_schema
from app.storage.rows import Clock, Row, message_row, system_clock
from app.storage.sqlite.checkpoint import Checkpointer
from app.storage.sqlite.connection import (
    connect_sqlite,
    describe_sqlite_error,
    prepare_database_file,
)
from app.storage.sqlite.console import (
    conversations_page,
    rejections_page,
    stored_contents,
    timeline_counts,
    write_rejections,
)
from app.storage.sqlite.feed import read_feed, read_head
from app.storage.sqlite.lifecycle import SQLiteLifecycle, load_key
from app.storage.sqlite.readers import ReaderPool, ReadTicket, await_read, run_ticket
from app.storage.sqlite.reads import check_schema, list_page, probe_write, read_stats
from app.storage.sqlite.search import SEARCH_BATCH
from app.storage.sqlite.writer import STOP, Call, Insert, Writer

T = TypeVar("T")

# The scan threads run under SCHED_IDLE (ReaderPool): on a core nothing else wants. Where
# that policy cannot be set, at this nice value: under CPU contention they then get about
# a tenth of what an ordinary thread gets (CFS weights 110 against 1024), so a burst of
# scans slows down itself rather than the webhooks.
SCAN_NICE = 10


class _Pools:
    """The reader pools of a file database (a :memory: one reads on the writer)."""

    def __init__(self, path: str, *, readers: int, max_scans: int, busy_timeout_ms: int) -> None:
        def pool(threads: int, name: str, nice: int = 0) -> ReaderPool:
            return ReaderPool(
                path, threads=threads, busy_timeout_ms=busy_timeout_ms, name=name, nice=nice
            )

        self.readers = pool(readers, "sqlite-reader")
        self.scanners = pool(max_scans, "sqlite-scan", SCAN_NICE)
        self.probe = pool(1, "sqlite-probe")

    async def close(self) -> None:
        for pool in (self.readers, self.scanners, self.probe):
            await pool.close()


class SQLiteStore:
    """MessageStore on SQLite. Build it with `await SQLiteStore.open(...)`."""

    def __init__(
        self,
        path: str,
        *,
        writer: Writer,
        pools: _Pools | None,
        checkpointer: Checkpointer | None,
        write_timeout: float,
        read_timeout: float,
        key: bytes,
        clock: Clock,
    ) -> None:
        self.path = path
        self._writer = writer
        self._pools = pools
        self._checkpointer = checkpointer
        self._write_timeout = write_timeout
        self._read_timeout = read_timeout
        self._identity = _file_identity(path)
        self._handover: list[Insert] = []
        self._deadlines: deque[tuple[float, asyncio.Future[bool]]] = deque()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self._probe: asyncio.Future[None] | None = None
        # The reads of a :memory: database in flight (they run on the writer thread).
        self._tickets: set[ReadTicket] = set()
        self.feed_signal = FeedSignal()
        # The highest committed position, as the event loop last heard from the writer.
        self._committed_position = writer.next_position - 1
        writer.on_commit = self._committed
        self.lifecycle = SQLiteLifecycle(self._read, self._write_call, writer, key=key, clock=clock)

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        busy_timeout_ms: int = 1000,
        write_timeout: float = 5.0,
        read_timeout: float = 5.0,
        readers: int = 4,
        max_scans: int = 2,
        clock: Clock = system_clock,
    ) -> SQLiteStore:
        memory = path == ":memory:"

        def setup() -> tuple[sqlite3.Connection, bytes]:
            prepare_database_file(path)
            conn = connect_sqlite(path, busy_timeout_ms=busy_timeout_ms)
            try:
                apply_sqlite_schema(conn)
                # The indexes an insert touches stay cached: at a million rows they
                # are tens of MB, and the default 2 MB cache re-reads them all the time.
                conn.execute("PRAGMA cache_size = -32768")
                if not memory:
                    conn.execute("PRAGMA wal_autocheckpoint = 0")
                    conn.execute("PRAGMA journal_size_limit = 67108864")
                key = load_key(conn)
            except BaseException:
                conn.close()
                raise
            return conn, key

        conn, key = await asyncio.to_thread(setup)
        writer = Writer(conn, asyncio.get_running_loop(), key=key, clock=clock)
        writer.start()
        # A :memory: database exists only inside its one connection, so reads go through
        # the writer thread too; a file gets reader connections and a checkpointer.
        pools = (
            None
            if memory
            else _Pools(path, readers=readers, max_scans=max_scans, busy_timeout_ms=busy_timeout_ms)
        )
        checkpointer = (
            None
            if pools is None
            else Checkpointer(
                path, writer.committed, scanning=pools.scanners.busy, restart=writer.restart_log
            )
        )
        if checkpointer is not None:
            checkpointer.start()
        return cls(
            path,
            writer=writer,
            pools=pools,
            checkpointer=checkpointer,
            write_timeout=write_timeout,
            read_timeout=read_timeout,
            key=key,
            clock=clock,
        )

    async def insert(self, message: Message) -> bool:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        # Rows are handed to the writer once per turn of the event loop, not one by one:
        # each hand-over wakes a thread, and under load one turn serves many requests.
        self._handover.append(Insert(message_row(message), future))
        if len(self._handover) == 1:
            loop.call_soon(self._hand_over)
        # No timer per request (asyncio.wait_for wraps the future in a task, call_later
        # makes a timer handle): the sweeper fails whatever waited too long.
        self._deadlines.append((loop.time() + self._write_timeout, future))
        return await future

    async def insert_many(self, messages: Sequence[Message]) -> list[bool | StorageUnavailable]:
        if not messages:
            return []
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[bool]] = [loop.create_future() for _ in messages]
        if not self._handover:
            loop.call_soon(self._hand_over)
        self._handover.extend(
            Insert(message_row(message), future)
            for message, future in zip(messages, futures, strict=True)
        )
        deadline = loop.time() + self._write_timeout
        self._deadlines.extend((deadline, future) for future in futures)
        # The sweeper fails what waits too long with StorageUnavailable, nothing else.
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        return [_outcome(outcome) for outcome in outcomes]

    async def _sweep(self) -> None:
        """Fail inserts that waited longer than write_timeout (a stuck disk, say).

        The row may still commit later; the sender's retry is then a duplicate.
        Deadlines are appended in order, so the oldest is always first.
        """
        loop = asyncio.get_running_loop()
        deadlines = self._deadlines
        while True:
            await asyncio.sleep(0.25)
            now = loop.time()
            while deadlines and (deadlines[0][1].done() or deadlines[0][0] <= now):
                _, future = deadlines.popleft()
                if not future.done():
                    future.set_exception(StorageUnavailable("write timed out"))

    def _hand_over(self) -> None:
        rows, self._handover = self._handover, []
        self._writer.jobs.put(rows)

    async def list_messages(self, query: ListQuery) -> MessagePage:
        return await self._read(lambda conn: list_page(conn, query), scan=is_scan(query))

    async def stats(self) -> Stats:
        return await self._read(read_stats)

    async def read_feed(self, query: FeedQuery) -> FeedBatch:
        committed = self._committed_position  # before the query: see read_feed()
        return await self._read(lambda conn: read_feed(conn, query, committed))

    async def feed_head(self) -> int:
        return await self._read(read_head)

    def _committed(self, position: int) -> None:
        self._committed_position = max(self._committed_position, position)
        self.feed_signal.notify()

    async def conversations(self, limit: int, after: tuple[str, str] | None) -> ConversationPage:
        return await self._read(lambda conn: conversations_page(conn, limit, after))

    async def timeline(self, span: TimelineRange) -> dict[str, int]:
        key_length = KEY_LENGTH[span.bucket]
        return await self._read(
            lambda conn: timeline_counts(conn, span.start_hour, span.end_hour, key_length)
        )

    async def rejections(self, limit: int, before: int | None) -> RejectionPage:
        return await self._read(lambda conn: rejections_page(conn, limit, before))

    async def record_rejections(self, refusals: Sequence[Refusal], keep: int) -> None:
        await self._write_call(lambda conn: write_rejections(conn, refusals, keep))

    async def stored_contents(self, ids: Sequence[str]) -> dict[str, StoredContent]:
        return await self._read(lambda conn: stored_contents(conn, ids))

    async def ping(self) -> None:
        def check(conn: sqlite3.Connection) -> None:
            # A deleted or replaced file still answers through open connections, and
            # rows written there would be lost: that is not ready.
            if self._identity is not None and _file_identity(self.path) != self._identity:
                raise StorageUnavailable("the database file was removed or replaced")
            check_schema(conn)

        await self._read(check, probe=True)
        if not self._writer.healthy:
            # The last commit failed: only a write proves that writes work again. One probe
            # write at a time: concurrent checks share it instead of queueing in front of
            # the inserts (each probe can wait out the busy timeout).
            if self._probe is None or self._probe.done():
                self._probe = asyncio.ensure_future(self._write_call(probe_write))
                self._probe.add_done_callback(_consume_outcome)
            await asyncio.shield(self._probe)
            self._writer.healthy = True

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run one read-only statement (diagnostics and tests; not part of the API)."""

        def run(conn: sqlite3.Connection) -> list[Row]:
            if not sql.lstrip().lower().startswith(("select", "with", "pragma")):
                raise ValueError("query() runs read-only statements only")
            return conn.execute(sql, params).fetchall()

        return await self._read(run)

    async def index_search(self, limit: int | None = None) -> None:
        """Bring the search index up to date now (or by `limit` rows at most).

        The writer does this by itself in its quiet moments; this is for tests and for
        an operator who wants it done before a query.
        """
        indexer = self._writer.search

        def run(conn: sqlite3.Connection) -> None:
            remaining = indexer.backlog + indexer.garbage if limit is None else limit
            while remaining > 0 and indexer.has_work:
                step = min(remaining, SEARCH_BATCH)
                indexer.work(step)
                remaining -= step

        await self._write_call(run)

    async def close(self) -> None:
        self._sweeper.cancel()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.stop)
        if self._pools is not None:
            await self._pools.close()
        for ticket in list(self._tickets):
            ticket.stop()
        self._writer.jobs.put(STOP)
        await asyncio.to_thread(self._writer.join)
        self._writer.conn.close()

    async def _read(
        self, fn: Callable[[sqlite3.Connection], T], *, scan: bool = False, probe: bool = False
    ) -> T:
        """`fn` on a reader connection, stopped at the read deadline (QueryTooExpensive).

        Scans wait for one of the few scan threads (within the same deadline).
        """
        pools = self._pools
        if pools is None:
            ticket = ReadTicket()
            future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            self._writer.jobs.put(Call(lambda conn: run_ticket(ticket, conn, fn), future))
            return await await_read(ticket, future, self._read_timeout, self._tickets)
        timeout = self._read_timeout
        if scan and self._checkpointer is not None and self._checkpointer.holding_scans:
            timeout = await self._wait_for_log_restart()
        pool = pools.probe if probe else pools.scanners if scan else pools.readers
        return await pool.run(fn, timeout)

    async def _wait_for_log_restart(self) -> float:
        """Hold a new scan while the checkpointer waits for scans to leave the log (see
        Checkpointer); what is left of the read deadline, or QueryTooExpensive."""
        checkpointer = self._checkpointer
        assert checkpointer is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._read_timeout
        while checkpointer.holding_scans:
            if loop.time() >= deadline:
                raise QueryTooExpensive("read held back past its deadline while the log restarts")
            await asyncio.sleep(0.1)
        return deadline - loop.time()

    async def _write_call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writer.jobs.put(Call(fn, future))
        try:
            return await asyncio.wait_for(future, self._write_timeout)
        except TimeoutError:
            raise StorageUnavailable("database call timed out") from None
        except sqlite3.Error as exc:
            raise StorageUnavailable(describe_sqlite_error(exc)) from None


def _outcome(outcome: bool | BaseException) -> bool | StorageUnavailable:
    if isinstance(outcome, StorageUnavailable | bool):
        return outcome
    raise outcome


def _consume_outcome(future: asyncio.Future[Any]) -> None:
    # A shared probe whose every waiter gave up still has its outcome read, so asyncio
    # does not report "exception was never retrieved".
    if not future.cancelled():
        future.exception()


def _file_identity(path: str) -> tuple[int, int] | None:
    if path == ":memory:":
        return None
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_dev, st.st_ino)
