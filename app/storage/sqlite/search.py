"""The SQLite search index, kept behind the inserts by the writer thread (sqlite/writer.py)."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence

from app.storage.sqlite.connection import describe_sqlite_error, rollback

logger = logging.getLogger("app.storage")

# Rows per step of SQLiteStore.index_search() (the writer's own steps: sqlite/writer.py).
SEARCH_BATCH = 2000


class SearchIndexer:
    """Keeps messages_fts behind the inserts, in batches, on the writer's connection.

    Indexing happens in its own transactions with synchronous=NORMAL (no fsync of its
    own): the index is derived data, and the next message commit's fsync covers it. A
    crash can only lose the index and its watermark together.

    Deleting a row from the index costs more than deleting the row (some 0.2 ms each:
    FTS5 writes a segment of delete markers, then merges it), so a retention purge leaves
    it for later: its rows' index entries wait in `search_garbage` and are deleted here,
    in the same quiet moments as indexing. A search meanwhile stays exact: a stale entry
    names a rowid that is gone (the join drops it) or, once reused, a row whose text is
    checked anyway. An erasure deletes its rows' entries at once, in its own transaction.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        # Whether the writer indexes by itself (tests turn it off to hold a state).
        self.automatic = True
        self.indexed_through = conn.execute(
            "SELECT indexed_through FROM search_progress WHERE id = 1"
        ).fetchone()[0]
        self.last_rowid = conn.execute("SELECT coalesce(max(rowid), 0) FROM messages").fetchone()[0]
        self.garbage = self._pending_garbage()

    @property
    def backlog(self) -> int:
        return int(self.last_rowid - self.indexed_through)

    @property
    def has_work(self) -> bool:
        return self.backlog > 0 or self.garbage > 0

    def work(self, limit: int) -> None:
        """One step of whatever is waiting: rows to index first, then stale entries."""
        if self.backlog > 0:
            self.index_some(limit)
        elif self.garbage > 0:
            self.collect_garbage(limit)

    def _pending_garbage(self) -> int:
        # Ids only grow and are deleted from the lowest: the span is the count.
        first, last = self.conn.execute("SELECT min(id), max(id) FROM search_garbage").fetchone()
        return 0 if first is None else int(last - first + 1)

    def defer(self, deleted: Sequence[tuple[int, str | None]]) -> int:
        """In a deleting transaction that held the index trigger off: queue the entries of
        the deleted (rowid, text_folded) rows that the index holds; how many."""
        cursor = self.conn.executemany(
            "INSERT INTO search_garbage (doc_rowid, text_folded) SELECT ?, ?"
            " WHERE ? <= (SELECT indexed_through FROM search_progress WHERE id = 1)",
            [(rowid, text, rowid) for rowid, text in deleted if text is not None],
        )
        return max(cursor.rowcount, 0)

    def defer_rowids(self, rowids: str) -> None:
        """The same as defer() for the rows of a JSON array of rowids, not yet deleted: in
        one statement, whatever their number (see purge_batch)."""
        self.conn.execute(
            "INSERT INTO search_garbage (doc_rowid, text_folded)"
            " SELECT rowid, text_folded FROM messages"
            " WHERE rowid IN (SELECT value FROM json_each(?)) AND text_folded IS NOT NULL"
            " AND rowid <= (SELECT indexed_through FROM search_progress WHERE id = 1)",
            (rowids,),
        )

    def lower_watermark(self) -> int:
        """After deleting rows, in the deleting transaction: the newest rowid left.

        SQLite gives a new row max(rowid) + 1, so once the newest rows are deleted their
        rowids are given out again. The watermark comes down to the newest row left (all
        rows up to it are still indexed), so that a row reusing a rowid gets indexed; and
        stale entries of the rowids above it are deleted now, before one is reused.
        Call settle() with the result once the transaction has committed.
        """
        conn = self.conn
        top: int = conn.execute("SELECT coalesce(max(rowid), 0) FROM messages").fetchone()[0]
        conn.execute(
            "UPDATE search_progress SET indexed_through = ? WHERE id = 1 AND indexed_through > ?",
            (top, top),
        )
        if conn.execute(
            "SELECT 1 FROM search_garbage WHERE doc_rowid > ? LIMIT 1", (top,)
        ).fetchone():
            self._delete_entries("doc_rowid > ?", top)
        return top

    def settle(self, top: int) -> None:
        self.indexed_through = min(self.indexed_through, top)
        self.last_rowid = min(self.last_rowid, top)
        self.garbage = self._pending_garbage()

    def _delete_entries(self, where: str, value: int) -> None:
        self.conn.execute(
            "INSERT INTO messages_fts (messages_fts, rowid, text_folded)"
            f" SELECT 'delete', doc_rowid, text_folded FROM search_garbage WHERE {where}"
            " ORDER BY id",
            (value,),
        )
        self.conn.execute(f"DELETE FROM search_garbage WHERE {where}", (value,))

    def collect_garbage(self, limit: int = SEARCH_BATCH) -> None:
        def step(conn: sqlite3.Connection) -> None:
            upto = conn.execute(
                "SELECT max(id) FROM (SELECT id FROM search_garbage ORDER BY id LIMIT ?)",
                (limit,),
            ).fetchone()[0]
            if upto is not None:
                self._delete_entries("id <= ?", upto)

        if self._derived_transaction(step, "search cleanup failed"):
            self.garbage = self._pending_garbage()

    def index_some(self, limit: int = SEARCH_BATCH) -> None:
        if self.backlog <= 0:
            return
        indexed: list[int | None] = [None]

        def step(conn: sqlite3.Connection) -> None:
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
            indexed[0] = upto

        if self._derived_transaction(step, "search indexing failed"):
            upto = indexed[0]
            self.indexed_through = upto if upto is not None else self.last_rowid

    def _derived_transaction(self, step: Callable[[sqlite3.Connection], None], failed: str) -> bool:
        conn = self.conn
        try:
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            step(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            rollback(conn)
            logger.warning(failed, extra={"error": describe_sqlite_error(exc)})
            return False
        finally:
            conn.execute("PRAGMA synchronous = FULL")
        return True
