"""The feed on SQLite: rows after a position, read on a reader connection.

One writer thread assigns positions as it builds each group and commits the groups in
order (app/storage/sqlite/writer.py), so a reader's snapshot always holds every position
up to the newest it sees: commit order is position order, and nothing can appear later
below it.
"""

from __future__ import annotations

import sqlite3

from app.models import FeedQuery
from app.storage.feed import FeedBatch

FEED_COLUMNS = "position, message_id, from_msisdn, to_msisdn, ts, text, created_at"
_ALL = f"SELECT {FEED_COLUMNS} FROM messages WHERE position > ? ORDER BY position LIMIT ?"
# A reader's snapshot holds every position up to the newest it sees: its newest is the head.
_HEAD = "SELECT coalesce(max(position), 0) FROM messages"
_FROM = (
    f"SELECT {FEED_COLUMNS} FROM messages WHERE from_msisdn = ? AND position > ?"
    " ORDER BY position LIMIT ?"
)


def read_feed(conn: sqlite3.Connection, query: FeedQuery, committed: int) -> FeedBatch:
    """`committed`: the writer's highest committed position, read before this query."""
    if query.sender is None:
        rows = conn.execute(_ALL, (query.after, query.limit)).fetchall()
    else:
        rows = conn.execute(_FROM, (query.sender, query.after, query.limit)).fetchall()
    if len(rows) == query.limit:
        return FeedBatch(rows, rows[-1][0])
    # Not full: everything committed up to here was read (a group committed since
    # `committed` was read may show up too, and then all before it has as well).
    return FeedBatch(rows, max(committed, rows[-1][0]) if rows else committed)


def read_head(conn: sqlite3.Connection) -> int:
    head: int = conn.execute(_HEAD).fetchone()[0]
    return head
