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
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Protocol, TypeVar

from app.models import (
    ListQuery,
    Message,
    MessagePage,
    SenderCount,
    Stats,
    encode_cursor,
    instant_key,
)

logger = logging.getLogger("app.storage")

T = TypeVar("T")
Row = tuple[Any, ...]

SCHEMA_VERSION = 1
# Rows per transaction at most; a burst bigger than this is committed in several.
MAX_BATCH = 512
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
        instant_key(message.ts),
        None if text is None else text.casefold(),
    )


def migrations(backend: str) -> list[tuple[int, str]]:
    """(version, sql) for every migration file shipped for a backend, in order."""
    folder = resources.files("app") / "schema" / backend
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


def split_statements(script: str) -> list[str]:
    # executescript() would COMMIT first; statement by statement keeps one transaction.
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in buffer.splitlines()
    ):
        raise ValueError("schema script ends with an incomplete statement")
    return statements


def apply_sqlite_schema(conn: sqlite3.Connection) -> int:
    """Bring the database to SCHEMA_VERSION, idempotently; returns the version before."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        before = int(row[0] or 0)
        for version, script in migrations("sqlite"):
            if version <= before:
                continue
            for statement in split_statements(script):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return before


def connect_sqlite(
    path: str, *, busy_timeout_ms: int, readonly: bool = False
) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False only
    # so that close() may run on another thread; each connection is used by one thread.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
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


_INSERT = (
    "INSERT INTO messages"
    " (message_id, from_msisdn, to_msisdn, ts, text, ts_key, text_folded, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (message_id) DO NOTHING"
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
            # The trigram index narrows the candidates; instr() below keeps the answer
            # exactly "folded q is a substring of folded text".
            phrase = '"' + folded.replace('"', '""') + '"'
            clauses.append("rowid IN (SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?)")
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
        self.jobs: queue.SimpleQueue[_Insert | _Call | object] = queue.SimpleQueue()
        # False after a failed commit, True after a good one: readiness reads it.
        self.healthy = True
        self.committed = threading.Event()

    def run(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            while len(jobs) < MAX_BATCH:
                try:
                    jobs.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            stop = False
            batch: list[_Insert] = []
            for job in jobs:
                if isinstance(job, _Insert):
                    batch.append(job)
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

    def _commit(self, batch: list[_Insert]) -> None:
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
        conn.execute("BEGIN IMMEDIATE")
        try:
            created = [conn.execute(_INSERT, (*job.row, now)).rowcount == 1 for job in batch]
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
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
    this thread runs a PASSIVE one (it never blocks the writer) shortly after commits.
    """

    def __init__(self, path: str, committed: threading.Event) -> None:
        super().__init__(name="sqlite-checkpointer", daemon=True)
        self.path = path
        self.committed = committed
        self.stopping = threading.Event()

    def run(self) -> None:
        conn = connect_sqlite(self.path, busy_timeout_ms=0)
        try:
            while not self.stopping.is_set():
                if not self.committed.wait(timeout=0.5):
                    continue
                self.committed.clear()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    logger.warning("checkpoint failed", extra={"error": describe_sqlite_error(exc)})
                # Let commits accumulate between checkpoints.
                self.stopping.wait(timeout=0.2)
        finally:
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
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._writer.jobs.put(_Insert(message_row(message), future))
        try:
            return await asyncio.wait_for(future, self._write_timeout)
        except TimeoutError:
            # The row may still commit later; the sender's retry is then a duplicate.
            raise StorageUnavailable("write timed out") from None

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

    async def close(self) -> None:
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
