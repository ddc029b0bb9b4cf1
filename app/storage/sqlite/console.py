"""What the SQLite store runs for the console: conversations, the timeline, rejections."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from app.records import ConversationPage, Refusal, RejectionPage, StoredContent
from app.storage.rows import REJECTION_COLUMNS, build_conversations, build_rejections
from app.storage.sqlite.connection import rollback

# Ids per statement when reading stored messages back (well under SQLite's variable limit).
IDS_PER_STATEMENT = 500

# Senders most recent first, from sender_counts_by_recency; the last message by its
# primary key, the first `ts` by one probe of messages_by_sender_ts. Only the page's rows
# are joined and probed.
CONVERSATIONS = """
SELECT s.from_msisdn, s.count, s.last_ts_key, m.message_id, m.to_msisdn, m.ts, m.text,
       (SELECT f.ts FROM messages f WHERE f.from_msisdn = s.from_msisdn
         ORDER BY f.ts_key, f.message_id LIMIT 1)
  FROM sender_counts s JOIN messages m ON m.message_id = s.last_message_id
 {where}
 ORDER BY s.last_ts_key DESC, s.last_message_id DESC LIMIT ?
"""


def conversations_page(
    conn: sqlite3.Connection, limit: int, after: tuple[str, str] | None
) -> ConversationPage:
    where, params = "", []
    if after is not None:
        where = "WHERE (s.last_ts_key, s.last_message_id) < (?, ?)"
        params = list(after)
    sql = CONVERSATIONS.format(where=where)
    rows = conn.execute(sql, [*params, limit + 1]).fetchall()
    return build_conversations(rows, limit)


def timeline_counts(
    conn: sqlite3.Connection, start_hour: str, end_hour: str, key_length: int
) -> dict[str, int]:
    """Messages per bucket (keyed by the first key_length characters of the hour key)."""
    rows = conn.execute(
        "SELECT substr(hour, 1, ?), sum(count) FROM message_hours"
        " WHERE hour >= ? AND hour < ? GROUP BY 1",
        (key_length, start_hour, end_hour),
    ).fetchall()
    return dict(rows)


def rejections_page(conn: sqlite3.Connection, limit: int, before: int | None) -> RejectionPage:
    where = "" if before is None else " WHERE id < ?"
    params = [] if before is None else [before]
    rows = conn.execute(
        f"SELECT {REJECTION_COLUMNS} FROM rejections{where} ORDER BY id DESC LIMIT ?",
        [*params, limit + 1],
    ).fetchall()
    return build_rejections(rows, limit)


def stored_contents(conn: sqlite3.Connection, ids: Sequence[str]) -> dict[str, StoredContent]:
    found: dict[str, StoredContent] = {}
    for start in range(0, len(ids), IDS_PER_STATEMENT):
        chunk = list(ids[start : start + IDS_PER_STATEMENT])
        marks = ", ".join("?" * len(chunk))
        rows = conn.execute(
            "SELECT message_id, from_msisdn, to_msisdn, ts_key, text FROM messages"
            f" WHERE message_id IN ({marks})",
            chunk,
        )
        found.update((row[0], row[1:]) for row in rows)
    return found


def write_rejections(conn: sqlite3.Connection, refusals: Sequence[Refusal], keep: int) -> None:
    """Append refusals and keep only the newest `keep`, in one transaction (writer thread).

    Without an fsync of its own (synchronous=NORMAL, as the search indexer): these rows
    are diagnostics, and the next message commit's fsync covers them.
    """
    if not refusals:
        return
    try:
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO rejections (at, endpoint, reason, field, remote, body_bytes,"
            " message_id, request_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            refusals,
        )
        conn.execute(
            "DELETE FROM rejections WHERE id < ("
            "SELECT id FROM rejections ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (keep - 1,),
        )
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    finally:
        conn.execute("PRAGMA synchronous = FULL")
