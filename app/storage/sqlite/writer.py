"""The SQLite writer thread: group commit of queued inserts, and search indexing.

One long-lived writer connection, owned by one thread. Webhook requests hand it their row
and wait on a future; the thread takes every row waiting at that moment, inserts them in
one statement and commits once (group commit): a burst of N deliveries costs one fsync,
not N, and no request ever blocks the event loop on SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.storage.base import StorageUnavailable
from app.storage.lifecycle import tombstone_hash
from app.storage.rows import Clock, Row, format_instant
from app.storage.sqlite.connection import MAX_BATCH, describe_sqlite_error
from app.storage.sqlite.search import SearchIndexer

logger = logging.getLogger("app.storage")

# Search indexing (see SearchIndexer): it runs once the writer has been idle for
# SEARCH_IDLE_SECONDS, SEARCH_CHUNK rows per transaction; only past SEARCH_BACKLOG_MAX
# unindexed rows does it also run between groups.
SEARCH_IDLE_SECONDS = 0.05
SEARCH_CHUNK = 500
# A search scans the unindexed rows one by one: 100k of them take ~13 ms, so a search
# stays under 20 ms however far behind the index is, and a burst of up to this many
# messages is indexed after it rather than during it.
SEARCH_BACKLOG_MAX = 100_000


# A whole group in one statement, a VALUES row per message: each SQLite call from the
# writer thread has to take the GIL back from the event loop afterwards, so one
# statement per group instead of one per row is what lets the writer keep up. One text
# per group size, each prepared once (the connection caches MAX_BATCH + 100 statements).
# (Rows as one JSON array through json_each, one text for all sizes, cost SQLite 45%
# more per row, parsing the JSON.) The tenth value of a row is its tombstone hash: an
# erased or purged id is left out in the same statement, under the same write lock as
# the insert, so no erasure can slip between the check and the write.
@functools.lru_cache(maxsize=MAX_BATCH)
def insert_group(rows: int) -> str:
    return (
        "INSERT INTO messages"
        " (message_id, from_msisdn, to_msisdn, ts, text, ts_key, text_folded, created_at,"
        " position) SELECT column1, column2, column3, column4, column5, column6, column7,"
        " column8, column9 FROM (VALUES "
        + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * rows)
        + ") WHERE NOT EXISTS (SELECT 1 FROM tombstones WHERE hash = column10)"
        " ON CONFLICT (message_id) DO NOTHING"
    )


# Which ids of the group were new, when some were not: the rows the statement created
# are the `changes()` rowids up to its last one (it allocates them consecutively while it
# holds the write lock), read back as one JSON array in one call.
_CREATED_BETWEEN = (
    "SELECT json_group_array(message_id) FROM messages WHERE rowid > ? AND rowid <= ?"
)


@dataclass(slots=True)
class Insert:
    row: Row
    future: asyncio.Future[bool]


@dataclass(slots=True)
class Call:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


@dataclass(slots=True)
class Restart:
    """From the checkpointer: make the log start over, between two groups."""

    done: threading.Event = field(default_factory=threading.Event)
    busy: bool = True


STOP = object()
# How long a RESTART on the writer's connection waits for readers to leave the log; the
# commits queued meanwhile wait as long.
RESTART_BUSY_MS = 200
Settlement = tuple[asyncio.Future[Any], Any, BaseException | None]
# Where the next position starts: past every stored one and every deleted one.
_NEXT_POSITION = (
    "SELECT 1 + max(coalesce((SELECT max(position) FROM messages), 0),"
    " (SELECT high_water FROM feed_state WHERE id = 1))"
)


class Writer(threading.Thread):
    """Owns the writer connection; commits queued inserts in groups."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        loop: asyncio.AbstractEventLoop,
        on_commit: Callable[[int], None] | None = None,
        *,
        key: bytes,
        clock: Clock,
    ) -> None:
        super().__init__(name="sqlite-writer", daemon=True)
        self.conn = conn
        self.loop = loop
        self.key = key
        self.clock = clock
        # Feed positions come from this counter, in the order groups are committed: one
        # writer, so commit order is position order (docs/feed.md). Called on the loop
        # after each commit with the highest position that is now committed.
        self.next_position: int = conn.execute(_NEXT_POSITION).fetchone()[0]
        self.on_commit = on_commit
        self.search = SearchIndexer(conn)
        # Inserts arrive in lists: the event loop hands over everything that arrived in
        # one turn at once (see SQLiteStore.insert).
        self.jobs: queue.SimpleQueue[list[Insert] | Call | Restart | object] = queue.SimpleQueue()
        (self.busy_timeout_ms,) = conn.execute("PRAGMA busy_timeout").fetchone()
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
                while self.search.automatic and self.search.has_work and self.jobs.empty():
                    self.search.work(SEARCH_CHUNK)
                continue
            while True:
                try:
                    jobs.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            stop = False
            rows = 0
            batch: list[Insert] = []
            for job in jobs:
                if isinstance(job, list):
                    batch.extend(job)
                    rows += len(job)
                    continue
                self._commit(batch)
                batch = []
                if isinstance(job, Call):
                    self._call(job)
                elif isinstance(job, Restart):
                    self._restart(job)
                else:
                    stop = True
            self._commit(batch)
            if stop:
                return
            # Under a load that never pauses, indexing keeps pace in proportion, so the
            # rows a search must scan unindexed stay bounded.
            if self.search.automatic and self.search.backlog > SEARCH_BACKLOG_MAX:
                self.search.index_some(2 * rows + 64)

    def _commit(self, batch: list[Insert]) -> None:
        # A bounded transaction, however much is waiting.
        while len(batch) > MAX_BATCH:
            self._commit(batch[:MAX_BATCH])
            batch = batch[MAX_BATCH:]
        if not batch:
            return
        try:
            try:
                created = self._insert_all(batch)
            except sqlite3.IntegrityError as exc:
                if "messages.position" not in str(exc):
                    raise
                # Another program inserted rows behind our back: start past them.
                self.next_position = self.conn.execute(_NEXT_POSITION).fetchone()[0]
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
            [(job.future, was_new, None) for job, was_new in zip(batch, created, strict=True)],
            committed=self.next_position - 1 if any(created) else None,
        )

    def _insert_all(self, batch: list[Insert]) -> list[bool]:
        conn = self.conn
        now = format_instant(self.clock())
        key = self.key
        first = self.next_position
        # Taken whether or not the statement commits: a gap, never a reuse.
        self.next_position = first + len(batch)
        params = [
            value
            for position, job in enumerate(batch, first)
            for value in (*job.row, now, position, tombstone_hash(key, job.row[0]))
        ]
        # One statement outside any BEGIN: SQLite runs it as its own transaction, takes
        # the write lock first and commits (fsync'd) before it returns. One call means
        # one trip away from and back to the GIL instead of three (BEGIN, INSERT,
        # COMMIT), and under load each trip back waits for the event loop to let go.
        cursor = conn.execute(insert_group(len(batch)), params)
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

    def _call(self, job: Call) -> None:
        try:
            result = job.fn(self.conn)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            self._settle([(job.future, None, exc)])
        else:
            # A call may have written (an erasure, a purge): the checkpointer's turn.
            self.committed.set()
            self._settle([(job.future, result, None)])

    def restart_log(self, timeout: float) -> bool | None:
        """From the checkpointer's thread: a RESTART checkpoint run here, between two groups.

        Whether the log started over (False: a reader was still in it), or None when the
        writer did not get to it within `timeout`. Here rather than on the checkpointer's
        connection because a RESTART holds commits back while it runs: from there, the
        writer found the lock taken and slept in the busy handler's steps (1, 2, 5, 10,
        15 ms...), so a RESTART of 23 ms held an insert 33 ms, one of 37 ms held it 53.
        Queued here, the commits behind it start the moment it ends.
        """
        job = Restart()
        self.jobs.put(job)
        if not job.done.wait(timeout):
            return None
        return not job.busy

    def _restart(self, job: Restart) -> None:
        conn = self.conn
        try:
            conn.execute(f"PRAGMA busy_timeout = {RESTART_BUSY_MS}")
            try:
                busy, _, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            job.busy = bool(busy)
        except sqlite3.Error as exc:
            logger.warning("checkpoint failed", extra={"error": describe_sqlite_error(exc)})
        finally:
            job.done.set()

    def announce(self, position: int) -> None:
        """From a call that inserted rows: positions up to `position` are committed."""
        self._settle([], committed=position)

    def _settle(self, settlements: list[Settlement], committed: int | None = None) -> None:
        # One wake-up of the event loop per group, not one per request.
        # RuntimeError: the loop is closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_settle_all, settlements, committed, self.on_commit)


def _settle_all(
    settlements: list[Settlement],
    committed: int | None,
    on_commit: Callable[[int], None] | None,
) -> None:
    for future, result, error in settlements:
        if future.done():  # the request timed out or went away
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    if committed is not None and on_commit is not None:
        on_commit(committed)
