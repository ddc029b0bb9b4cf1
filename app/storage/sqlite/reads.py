"""What the SQLite store runs on a reader connection: pages, stats, and readiness checks."""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from app.models import ListQuery, MessagePage, SenderCount, Stats
from app.storage.base import TRIGRAM, StorageUnavailable
from app.storage.migrations import SCHEMA_VERSION
from app.storage.rows import build_page, utc_now
from app.storage.sqlite.connection import rollback

# After a failed write, readiness wants this much room in the database and on its disk.
PROBE_ROOM_BYTES = 1024 * 1024
_COLUMNS = "message_id, from_msisdn, to_msisdn, ts, text, ts_key, created_at"


def list_filters(query: ListQuery) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if query.sender is not None:
        clauses.append("from_msisdn = ?")
        params.append(query.sender)
    if query.recipient is not None:
        clauses.append("to_msisdn = ?")
        params.append(query.recipient)
    if query.since_key is not None:
        clauses.append("ts_key >= ?")
        params.append(query.since_key)
    if query.until_key is not None:
        clauses.append("ts_key < ?")
        params.append(query.until_key)
    if query.q:
        folded = query.q.casefold()
        if len(folded) >= TRIGRAM:
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


def list_page(conn: sqlite3.Connection, query: ListQuery) -> MessagePage:
    clauses, params = list_filters(query)
    conn.execute("BEGIN")
    try:
        if clauses:
            where = " WHERE " + " AND ".join(clauses)
            total = conn.execute(f"SELECT count(*) FROM messages{where}", params).fetchone()[0]
        else:
            total = conn.execute("SELECT total FROM message_totals WHERE id = 1").fetchone()[0]
        page_clauses, page_params = list(clauses), list(params)
        if query.after is not None:
            page_clauses.append(f"(ts_key, message_id) {'<' if query.descending else '>'} (?, ?)")
            page_params.extend(query.after)
        where = " WHERE " + " AND ".join(page_clauses) if page_clauses else ""
        order = "ts_key DESC, message_id DESC" if query.descending else "ts_key, message_id"
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM messages{where} ORDER BY {order} LIMIT ? OFFSET ?",
            [*page_params, query.limit + 1, query.offset],
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    return build_page(rows, total, query)


def read_stats(conn: sqlite3.Connection) -> Stats:
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


def check_schema(conn: sqlite3.Connection) -> None:
    try:
        version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        conn.execute("SELECT message_id FROM messages LIMIT 0").fetchall()
    except sqlite3.DatabaseError as exc:
        raise StorageUnavailable(f"schema check failed: {exc}") from None
    if version != SCHEMA_VERSION:
        raise StorageUnavailable(f"schema version is {version}, expected {SCHEMA_VERSION}")


def probe_write(conn: sqlite3.Connection) -> None:
    check_room(conn)
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "INSERT INTO write_probe (id, at) VALUES (1, ?)"
            " ON CONFLICT (id) DO UPDATE SET at = excluded.at",
            (utc_now(),),
        )
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise


def check_room(conn: sqlite3.Connection) -> None:
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
