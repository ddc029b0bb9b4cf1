"""The message store: a narrow interface, and its SQLite implementation.

SQLite design, in short:

- One long-lived writer connection, owned by one thread. Webhook requests hand it their
  row and wait on a future; the thread takes every row waiting at that moment, inserts
  them in one transaction and commits once (group commit). A burst of N deliveries costs
  one fsync, not N, and no request ever blocks the event loop on SQLite.
- WAL with synchronous=FULL: a commit returns only once the log is fsync'd, so a `200`
  survives power loss, not only a process crash. Checkpoints run in their own thread.
- Reads run on a small pool of reader connections (WAL lets them proceed during a write).
- Idempotency is the primary key: INSERT ... ON CONFLICT DO NOTHING, never a read first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import queue
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from app.migrations import SCHEMA_VERSION, apply_sqlite_schema
from app.models import (
    ListQuery,
    Message,
    MessagePage,
    SenderCount,
    Stats,
    encode_cursor,
    valid_instant_key,
)

logger = logging.getLogger("app.storage")

T = TypeVar("T")
Row = tuple[Any, ...]

# Rows per transaction at most; a burst bigger than this is committed in several.
MAX_BATCH = 512
# Search indexing (see _SearchIndexer): it runs once the writer has been idle for
# SEARCH_IDLE_SECONDS, SEARCH_CHUNK rows per transaction; only past SEARCH_BACKLOG_MAX
# unindexed rows does it also run between groups. SEARCH_BATCH: index_search()'s step.
SEARCH_IDLE_SECONDS = 0.05
SEARCH_CHUNK = 500
# A search scans the unindexed rows one by one: 100k of them take ~13 ms, so a search
# stays under 20 ms however far behind the index is, and a burst of up to this many
# messages is indexed after it rather than during it.
SEARCH_BACKLOG_MAX = 100_000
SEARCH_BATCH = 2000
# Page size of a database this service creates (see connect_sqlite).
PAGE_SIZE = 2048
# Past this much log, the checkpointer makes the WAL start over (see _Checkpointer).
WAL_RESTART_BYTES = 16 * 1024 * 1024
# How long the checkpointer lets commits accumulate between two checkpoints.
CHECKPOINT_INTERVAL_SECONDS = 0.25
# After a failed write, readiness wants this much room in the database and on its disk.
PROBE_ROOM_BYTES = 1024 * 1024


class StorageUnavailable(Exception):
    """The database cannot serve this request now (locked, full, read-only, gone).

    The message is for logs; clients get a generic 503 with Retry-After.
    """


class MessageStore(Protocol):
    async def insert(self, message: Message) -> bool:
        """Store the message unless its message_id is already stored; True if it was new."""
        ...

    async def list_messages(self, query: ListQuery) -> MessagePage: ...

    async def stats(self) -> Stats: ...

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the database answers, has our schema and writes."""
        ...

    async def close(self) -> None: ...


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def message_row(message: Message) -> Row:
    text = message.text
    return (
        message.message_id,
        message.from_,
        message.to,
        message.ts,
        text,
        valid_instant_key(message.ts),
        None if text is None else text.casefold(),
    )


def connect_sqlite(
    path: str, *, busy_timeout_ms: int, readonly: bool = False
) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False only
    # so that close() may run on another thread; each connection is used by one thread.
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        check_same_thread=False,
        timeout=0,
        cached_statements=MAX_BATCH + 100,  # the writer's group inserts, one per size
    )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    # For a new database only (an existing one keeps its size). Inserts land at random
    # places in the indexes and each commit writes every page it touched to the WAL:
    # 2 KB pages write a third less than the default 4 KB, for a tenth less CPU.
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    if path != ":memory:":
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal" and not readonly:
            raise sqlite3.OperationalError(f"could not switch to WAL (journal_mode={mode})")
    # FULL: in WAL mode every commit fsyncs the log. NORMAL would only survive a crash
    # of the process, not a power cut.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA temp_store = MEMORY")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    return conn


def init_sqlite(path: str) -> int:
    """Create or upgrade the schema of a SQLite database file (the `init-db` command)."""
    ensure_parent(path)
    conn = connect_sqlite(path, busy_timeout_ms=5000)
    try:
        apply_sqlite_schema(conn)
    finally:
        conn.close()
    return SCHEMA_VERSION


def ensure_parent(path: str) -> None:
    if path != ":memory:":
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)


# A whole group in one statement, a VALUES row per message: each SQLite call from the
# writer thread has to take the GIL back from the event loop afterwards, so one
# statement per group instead of one per row is what lets the writer keep up. One text
# per group size, each prepared once (the connection caches MAX_BATCH + 100 statements).
# (Rows as one JSON array through json_each, one text for all sizes, cost SQLite 45%
# more per row, parsing the JSON.)
@functools.lru_cache(maxsize=MAX_BATCH)
def _insert_group(rows: int) -> str:
    return (
        "INSERT INTO messages"
        " (message_id, from_msisdn, to_msisdn, ts, text, ts_key, text_folded, created_at)"
        " VALUES "
        + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
        + " ON CONFLICT (message_id) DO NOTHING"
    )


# Which ids of the group were new, when some were not: the rows the statement created
# are the `changes()` rowids up to its last one (it allocates them consecutively while it
# holds the write lock), read back as one JSON array in one call.
_CREATED_BETWEEN = (
    "SELECT json_group_array(message_id) FROM messages WHERE rowid > ? AND rowid <= ?"
)
_COLUMNS = "message_id, from_msisdn, to_msisdn, ts, text, ts_key"


def _filters(query: ListQuery) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if query.sender is not None:
        clauses.append("from_msisdn = ?")
        params.append(query.sender)
    if query.since_key is not None:
        clauses.append("ts_key >= ?")
        params.append(query.since_key)
    if query.q:
        folded = query.q.casefold()
        if len(folded) >= 3:
            # The trigram index narrows the candidates, plus the rows the index has not
            # reached yet; instr() below keeps the answer exactly "folded q is a substring
            # of folded text".
            phrase = '"' + folded.replace('"', '""') + '"'
            clauses.append(
                "rowid IN (SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?"
                " UNION ALL SELECT rowid FROM messages WHERE rowid >"
                " (SELECT indexed_through FROM search_progress WHERE id = 1))"
            )
            params.append(phrase)
        clauses.append("instr(text_folded, ?) > 0")
        params.append(folded)
    return clauses, params


def _list(conn: sqlite3.Connection, query: ListQuery) -> MessagePage:
    clauses, params = _filters(query)
    conn.execute("BEGIN")
    try:
        if clauses:
            where = " WHERE " + " AND ".join(clauses)
            total = conn.execute(f"SELECT count(*) FROM messages{where}", params).fetchone()[0]
        else:
            total = conn.execute("SELECT total FROM message_totals WHERE id = 1").fetchone()[0]
        page_clauses, page_params = list(clauses), list(params)
        if query.after is not None:
            page_clauses.append("(ts_key, message_id) > (?, ?)")
            page_params.extend(query.after)
        where = " WHERE " + " AND ".join(page_clauses) if page_clauses else ""
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM messages{where} ORDER BY ts_key, message_id LIMIT ? OFFSET ?",
            [*page_params, query.limit + 1, query.offset],
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    return build_page(rows, total, query)


def build_page(rows: Sequence[Row], total: int, query: ListQuery) -> MessagePage:
    """A page from up to limit+1 rows of (id, from, to, ts, text, ts_key)."""
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    data = [
        Message.model_construct(message_id=r[0], from_=r[1], to=r[2], ts=r[3], text=r[4])
        for r in rows
    ]
    next_cursor = encode_cursor(rows[-1][5], rows[-1][0]) if more else None
    return MessagePage(
        data=data, total=total, limit=query.limit, offset=query.offset, next_cursor=next_cursor
    )


def _stats(conn: sqlite3.Connection) -> Stats:
    conn.execute("BEGIN")
    try:
        total, senders = conn.execute(
            "SELECT total, senders FROM message_totals WHERE id = 1"
        ).fetchone()
        top = conn.execute(
            "SELECT from_msisdn, count FROM sender_counts ORDER BY count DESC, from_msisdn LIMIT 10"
        ).fetchall()
        first = conn.execute(
            "SELECT ts FROM messages ORDER BY ts_key, message_id LIMIT 1"
        ).fetchone()
        last = conn.execute(
            "SELECT ts FROM messages ORDER BY ts_key DESC, message_id DESC LIMIT 1"
        ).fetchone()
    finally:
        conn.execute("COMMIT")
    return Stats(
        total_messages=total,
        senders_count=senders,
        messages_per_sender=[SenderCount(from_=f, count=c) for f, c in top],
        first_message_ts=first[0] if first else None,
        last_message_ts=last[0] if last else None,
    )


def _check_schema(conn: sqlite3.Connection) -> None:
    try:
        version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        conn.execute("SELECT message_id FROM messages LIMIT 0").fetchall()
    except sqlite3.DatabaseError as exc:
        raise StorageUnavailable(f"schema check failed: {exc}") from None
    if version != SCHEMA_VERSION:
        raise StorageUnavailable(f"schema version is {version}, expected {SCHEMA_VERSION}")


def _probe_write(conn: sqlite3.Connection) -> None:
    _check_room(conn)
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "INSERT INTO write_probe (id, at) VALUES (1, ?)"
            " ON CONFLICT (id) DO UPDATE SET at = excluded.at",
            (utc_now(),),
        )
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _check_room(conn: sqlite3.Connection) -> None:
    """Raise StorageUnavailable unless the database and its disk have PROBE_ROOM_BYTES free.

    The probe row is tiny and fits where a failed batch left room (in the WAL, in a
    half-full page), so on a full disk it can succeed while every real insert fails.
    """
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    limit = conn.execute("PRAGMA max_page_count").fetchone()[0]
    free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
    if (limit - pages + free_pages) * page_size < PROBE_ROOM_BYTES:
        raise StorageUnavailable("the database is at its max_page_count")
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    if path:  # "" for :memory:
        try:
            fs = os.statvfs(os.path.dirname(path))
        except OSError as exc:
            raise StorageUnavailable(f"cannot read free space: {exc.strerror}") from None
        # Root may also write into the blocks a filesystem reserves for it.
        blocks = fs.f_bfree if os.geteuid() == 0 else fs.f_bavail
        if blocks * fs.f_frsize < PROBE_ROOM_BYTES:
            raise StorageUnavailable("the disk is full")


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass


@dataclass(slots=True)
class _Insert:
    row: Row
    future: asyncio.Future[bool]


@dataclass(slots=True)
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


_STOP = object()
Settlement = tuple[asyncio.Future[Any], Any, BaseException | None]


class _Writer(threading.Thread):
    """Owns the writer connection; commits queued inserts in groups."""

    def __init__(self, conn: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(name="sqlite-writer", daemon=True)
        self.conn = conn
        self.loop = loop
        self.search = _SearchIndexer(conn)
        # Inserts arrive in lists: the event loop hands over everything that arrived in
        # one turn at once (see SQLiteStore.insert).
        self.jobs: queue.SimpleQueue[list[_Insert] | _Call | object] = queue.SimpleQueue()
        # False after a failed commit, True after a good one: readiness reads it.
        self.healthy = True
        self.committed = threading.Event()

    def run(self) -> None:
        while True:
            try:
                jobs = [self.jobs.get(timeout=SEARCH_IDLE_SECONDS)]
            except queue.Empty:
                # Quiet for a moment: catch the search index up, a chunk at a time, for
                # as long as nothing waits (a chunk delays a new arrival by a few ms).
                while self.search.automatic and self.search.backlog > 0 and self.jobs.empty():
                    self.search.index_some(SEARCH_CHUNK)
                continue
            while True:
                try:
                    jobs.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            stop = False
            rows = 0
            batch: list[_Insert] = []
            for job in jobs:
                if isinstance(job, list):
                    batch.extend(job)
                    rows += len(job)
                    continue
                self._commit(batch)
                batch = []
                if isinstance(job, _Call):
                    self._call(job)
                else:
                    stop = True
            self._commit(batch)
            if stop:
                return
            # Under a load that never pauses, indexing keeps pace in proportion, so the
            # rows a search must scan unindexed stay bounded.
            if self.search.automatic and self.search.backlog > SEARCH_BACKLOG_MAX:
                self.search.index_some(2 * rows + 64)

    def _commit(self, batch: list[_Insert]) -> None:
        # A bounded transaction, however much is waiting.
        while len(batch) > MAX_BATCH:
            self._commit(batch[:MAX_BATCH])
            batch = batch[MAX_BATCH:]
        if not batch:
            return
        try:
            created = self._insert_all(batch)
        except sqlite3.OperationalError as exc:
            # Locked, full, read-only, I/O: the environment, not the rows. Fail them all.
            self.healthy = False
            logger.error(
                "commit failed", extra={"error": describe_sqlite_error(exc), "rows": len(batch)}
            )
            error = StorageUnavailable(describe_sqlite_error(exc))
            self._settle([(job.future, None, error) for job in batch])
            return
        except Exception:
            if len(batch) > 1:
                # Something about one row (it should not happen: rows are validated).
                # Retry one by one so that a single bad row fails alone.
                for job in batch:
                    self._commit([job])
                return
            logger.exception("insert failed")
            self._settle([(batch[0].future, None, StorageUnavailable("insert failed"))])
            return
        self.healthy = True
        self.committed.set()
        self._settle(
            [(job.future, was_new, None) for job, was_new in zip(batch, created, strict=True)]
        )

    def _insert_all(self, batch: list[_Insert]) -> list[bool]:
        conn = self.conn
        now = utc_now()
        params = [value for job in batch for value in (*job.row, now)]
        # One statement outside any BEGIN: SQLite runs it as its own transaction, takes
        # the write lock first and commits (fsync'd) before it returns. One call means
        # one trip away from and back to the GIL instead of three (BEGIN, INSERT,
        # COMMIT), and under load each trip back waits for the event loop to let go.
        cursor = conn.execute(_insert_group(len(batch)), params)
        inserted, last_rowid = cursor.rowcount, cursor.lastrowid or 0
        if inserted > 0:
            self.search.last_rowid = last_rowid
        if inserted == len(batch):
            return [True] * len(batch)  # all new: the common case costs no more
        if inserted == 0:
            return [False] * len(batch)
        noted = conn.execute(_CREATED_BETWEEN, (last_rowid - inserted, last_rowid)).fetchone()[0]
        new_ids = set(json.loads(noted))
        # The first delivery of an id in the group is the one that created its row.
        created = []
        for job in batch:
            message_id = job.row[0]
            created.append(message_id in new_ids)
            new_ids.discard(message_id)
        return created

    def _call(self, job: _Call) -> None:
        try:
            result = job.fn(self.conn)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            self._settle([(job.future, None, exc)])
        else:
            self._settle([(job.future, result, None)])

    def _settle(self, settlements: list[Settlement]) -> None:
        # One wake-up of the event loop per group, not one per request.
        # RuntimeError: the loop is closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_settle_all, settlements)


class _SearchIndexer:
    """Keeps messages_fts behind the inserts, in batches, on the writer's connection.

    Indexing happens in its own transactions with synchronous=NORMAL (no fsync of its
    own): the index is derived data, and the next message commit's fsync covers it. A
    crash can only lose the index and its watermark together.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        # Whether the writer indexes by itself (tests turn it off to hold a state).
        self.automatic = True
        self.indexed_through = conn.execute(
            "SELECT indexed_through FROM search_progress WHERE id = 1"
        ).fetchone()[0]
        self.last_rowid = conn.execute("SELECT coalesce(max(rowid), 0) FROM messages").fetchone()[0]

    @property
    def backlog(self) -> int:
        return int(self.last_rowid - self.indexed_through)

    def index_some(self, limit: int = SEARCH_BATCH) -> None:
        if self.backlog <= 0:
            return
        conn = self.conn
        try:
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            upto = conn.execute(
                "SELECT max(rowid) FROM (SELECT rowid FROM messages WHERE rowid > ?"
                " ORDER BY rowid LIMIT ?)",
                (self.indexed_through, limit),
            ).fetchone()[0]
            if upto is not None:
                conn.execute(
                    "INSERT INTO messages_fts (rowid, text_folded) SELECT rowid, text_folded"
                    " FROM messages WHERE rowid > ? AND rowid <= ? AND text_folded IS NOT NULL",
                    (self.indexed_through, upto),
                )
                conn.execute("UPDATE search_progress SET indexed_through = ? WHERE id = 1", (upto,))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            logger.warning("search indexing failed", extra={"error": describe_sqlite_error(exc)})
            return
        finally:
            conn.execute("PRAGMA synchronous = FULL")
        self.indexed_through = upto if upto is not None else self.last_rowid


def _settle_all(settlements: list[Settlement]) -> None:
    for future, result, error in settlements:
        if future.done():  # the request timed out or went away
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def describe_sqlite_error(exc: sqlite3.Error) -> str:
    code = getattr(exc, "sqlite_errorname", None)
    return f"{code}: {exc}" if code else str(exc)


class _Checkpointer(threading.Thread):
    """Copies the WAL back into the database file off the request path.

    The writer runs with wal_autocheckpoint=0, so no webhook ever pays for a checkpoint;
    this thread runs a PASSIVE one (it never blocks the writer) four times a second while
    commits arrive. Often and small, because the copy is not free for the writer either:
    with a checkpoint a second, the commit right after it took 25-45 ms (its fsync waits
    for the disk to take the pages just copied, as ext4 orders them).

    Under a load that never pauses, PASSIVE alone never lets the log start over (the
    writer has always appended more by the time it finishes), and the WAL would grow
    without bound. So once the log holds WAL_RESTART_BYTES, a RESTART follows: it holds
    commits back while it copies the frames appended since and fsyncs the database file,
    and the next commit then writes the log from its start. The database file is fsync'd
    just before, with no lock held, so that the RESTART's own fsync has next to nothing
    left to write: without it, commits stalled for 50-80 ms once a second at 13k rows/s.
    """

    def __init__(self, path: str, committed: threading.Event) -> None:
        super().__init__(name="sqlite-checkpointer", daemon=True)
        self.path = path
        self.committed = committed
        self.stopping = threading.Event()

    def run(self) -> None:
        conn = connect_sqlite(self.path, busy_timeout_ms=200)
        database = os.open(self.path, os.O_RDONLY)
        try:
            (page_size,) = conn.execute("PRAGMA page_size").fetchone()
            restart_frames = WAL_RESTART_BYTES // (page_size + 24)  # a frame header is 24
            while not self.stopping.is_set():
                if not self.committed.wait(timeout=0.5):
                    continue
                self.committed.clear()
                try:
                    _busy, frames, _copied = conn.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)"
                    ).fetchone()
                    if frames > restart_frames:
                        os.fsync(database)
                        conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
                except (sqlite3.Error, OSError) as exc:
                    error = (
                        describe_sqlite_error(exc) if isinstance(exc, sqlite3.Error) else str(exc)
                    )
                    logger.warning("checkpoint failed", extra={"error": error})
                # Let commits accumulate a little: a page written many times in that
                # while is copied back once.
                self.stopping.wait(timeout=CHECKPOINT_INTERVAL_SECONDS)
        finally:
            os.close(database)
            conn.close()

    def stop(self) -> None:
        self.stopping.set()
        self.committed.set()
        self.join()


class SQLiteStore:
    """MessageStore on SQLite. Build it with `await SQLiteStore.open(...)`."""

    def __init__(
        self,
        path: str,
        *,
        writer: _Writer,
        readers: ThreadPoolExecutor | None,
        checkpointer: _Checkpointer | None,
        busy_timeout_ms: int,
        write_timeout: float,
    ) -> None:
        self.path = path
        self._writer = writer
        self._readers = readers
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_local = threading.local()
        self._checkpointer = checkpointer
        self._busy_timeout_ms = busy_timeout_ms
        self._write_timeout = write_timeout
        self._identity = _file_identity(path)
        self._handover: list[_Insert] = []
        self._deadlines: deque[tuple[float, asyncio.Future[bool]]] = deque()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self._lock = threading.Lock()
        self._probe: asyncio.Future[None] | None = None

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        busy_timeout_ms: int = 1000,
        write_timeout: float = 5.0,
        readers: int = 4,
    ) -> SQLiteStore:
        memory = path == ":memory:"

        def setup() -> sqlite3.Connection:
            ensure_parent(path)
            conn = connect_sqlite(path, busy_timeout_ms=busy_timeout_ms)
            try:
                apply_sqlite_schema(conn)
                # The indexes an insert touches stay cached: at a million rows they
                # are tens of MB, and the default 2 MB cache re-reads them all the time.
                conn.execute("PRAGMA cache_size = -32768")
                if not memory:
                    conn.execute("PRAGMA wal_autocheckpoint = 0")
                    conn.execute("PRAGMA journal_size_limit = 67108864")
            except BaseException:
                conn.close()
                raise
            return conn

        conn = await asyncio.to_thread(setup)
        writer = _Writer(conn, asyncio.get_running_loop())
        writer.start()
        # A :memory: database exists only inside its one connection, so reads go through
        # the writer thread too; a file gets reader connections and a checkpointer.
        pool = None if memory else ThreadPoolExecutor(readers, thread_name_prefix="sqlite-reader")
        checkpointer = None if memory else _Checkpointer(path, writer.committed)
        if checkpointer is not None:
            checkpointer.start()
        return cls(
            path,
            writer=writer,
            readers=pool,
            checkpointer=checkpointer,
            busy_timeout_ms=busy_timeout_ms,
            write_timeout=write_timeout,
        )

    async def insert(self, message: Message) -> bool:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bool] = loop.create_future()
        # Rows are handed to the writer once per turn of the event loop, not one by one:
        # each hand-over wakes a thread, and under load one turn serves many requests.
        self._handover.append(_Insert(message_row(message), future))
        if len(self._handover) == 1:
            loop.call_soon(self._hand_over)
        # No timer per request (asyncio.wait_for wraps the future in a task, call_later
        # makes a timer handle): the sweeper fails whatever waited too long.
        self._deadlines.append((loop.time() + self._write_timeout, future))
        return await future

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
        return await self._read(lambda conn: _list(conn, query))

    async def stats(self) -> Stats:
        return await self._read(_stats)

    async def ping(self) -> None:
        def check(conn: sqlite3.Connection) -> None:
            # A deleted or replaced file still answers through open connections, and
            # rows written there would be lost: that is not ready.
            if self._identity is not None and _file_identity(self.path) != self._identity:
                raise StorageUnavailable("the database file was removed or replaced")
            _check_schema(conn)

        await self._read(check)
        if not self._writer.healthy:
            # The last commit failed: only a write proves that writes work again. One probe
            # write at a time: concurrent checks share it instead of queueing in front of
            # the inserts (each probe can wait out the busy timeout).
            if self._probe is None or self._probe.done():
                self._probe = asyncio.ensure_future(self._write_call(_probe_write))
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
            remaining = indexer.backlog if limit is None else limit
            while remaining > 0 and indexer.backlog > 0:
                step = min(remaining, SEARCH_BATCH)
                indexer.index_some(step)
                remaining -= step

        await self._write_call(run)

    async def close(self) -> None:
        self._sweeper.cancel()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.stop)
        if self._readers is not None:
            await asyncio.to_thread(self._readers.shutdown, True)
            for conn in self._reader_conns:
                conn.close()
        self._writer.jobs.put(_STOP)
        await asyncio.to_thread(self._writer.join)
        self._writer.conn.close()

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._readers is None:
            result: T = await self._write_call(fn)
            return result
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._readers, self._in_reader, fn)
        except sqlite3.Error as exc:
            raise StorageUnavailable(describe_sqlite_error(exc)) from None

    def _in_reader(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._reader_local, "conn", None)
        if conn is None:
            conn = connect_sqlite(self.path, busy_timeout_ms=self._busy_timeout_ms, readonly=True)
            conn.execute("PRAGMA cache_size = -8000")
            self._reader_local.conn = conn
            with self._lock:
                self._reader_conns.append(conn)
        try:
            return fn(conn)
        except BaseException:
            _rollback(conn)
            raise

    async def _write_call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._writer.jobs.put(_Call(fn, future))
        try:
            return await asyncio.wait_for(future, self._write_timeout)
        except TimeoutError:
            raise StorageUnavailable("database call timed out") from None
        except sqlite3.Error as exc:
            raise StorageUnavailable(describe_sqlite_error(exc)) from None


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
