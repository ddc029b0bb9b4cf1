"""The data lifecycle on SQLite: erasure, retention, import on the writer; reads on a reader.

Everything that deletes or imports runs on the writer thread (SQLiteStore hands it over as
a Call), between two groups of inserts: a redelivery is either committed before an
erasure, which then deletes it, or checked against its tombstone after, in the insert
statement itself. Each call is one short transaction, so the inserts queued behind it
wait for one batch, never for a whole purge.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from app.models import ListQuery, StoredMessage
from app.storage.lifecycle import (
    EXPORT_COLUMNS,
    EXPORT_PAGE,
    Erasure,
    ImportCounts,
    ImportRow,
    number_digest,
    stored_message,
    tombstone_hash,
)
from app.storage.rows import Clock, Row, format_instant, message_row
from app.storage.sqlite.connection import MAX_BATCH, rollback
from app.storage.sqlite.reads import list_filters
from app.storage.sqlite.search import SearchIndexer
from app.storage.sqlite.writer import Writer, insert_group

T = TypeVar("T")


class RunOn(Protocol):
    """The store's way to run `fn` on one of its connections (a reader, or the writer)."""

    def __call__(self, fn: Callable[[sqlite3.Connection], T]) -> Awaitable[T]: ...


# A permanent tombstone (expires_at NULL) stays permanent; of two expiring ones, the later
# expiry wins. SQLite's max() of anything and NULL is NULL.
_TOMBSTONES = (
    "INSERT INTO tombstones (hash, created_at, expires_at) VALUES {rows}"
    " ON CONFLICT (hash) DO UPDATE SET expires_at = max(expires_at, excluded.expires_at)"
)
TOMBSTONE_CHUNK = 5000
# Rows an erasure of a number reads per step, by rowid, and deletes at most per step:
# the write lock is held for one step at a time (some 20 ms: each erased row's search
# entries go in the same transaction), however big the table.
ERASE_WINDOW = 20_000
ERASE_STEP = 100


@contextmanager
def write_transaction(conn: sqlite3.Connection, *, durable: bool = True) -> Iterator[None]:
    """One write transaction; `durable=False` commits without an fsync of its own.

    For what a crash may undo without harm (a purge batch runs again, and its tombstones
    go with its deletes): the next durable commit's fsync of the log covers it, as for
    the search index. The writer connection is FULL again afterwards.
    """
    if not durable:
        conn.execute("PRAGMA synchronous = NORMAL")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
    finally:
        if not durable:
            conn.execute("PRAGMA synchronous = FULL")


def _bury(
    conn: sqlite3.Connection, key: bytes, ids: Sequence[str], now: str, expires: str | None
) -> int:
    # One statement for them all (see purge_batch), in chunks under SQLite's 32,766
    # parameters.
    for start in range(0, len(ids), TOMBSTONE_CHUNK):
        chunk = ids[start : start + TOMBSTONE_CHUNK]
        values = [value for i in chunk for value in (tombstone_hash(key, i), now, expires)]
        conn.execute(_TOMBSTONES.format(rows=", ".join(["(?, ?, ?)"] * len(chunk))), values)
    return len(ids)


def _forget_rejections(conn: sqlite3.Connection, ids: Sequence[str]) -> None:
    # A refused delivery's row names its message_id (a conflict): erased with the message.
    conn.execute(f"DELETE FROM rejections WHERE message_id IN ({', '.join('?' * len(ids))})", ids)


def load_key(conn: sqlite3.Connection) -> bytes:
    key: bytes = conn.execute("SELECT key FROM lifecycle_key WHERE id = 1").fetchone()[0]
    return key


def get_message(conn: sqlite3.Connection, message_id: str) -> StoredMessage | None:
    row = conn.execute(
        f"SELECT {EXPORT_COLUMNS} FROM messages WHERE message_id = ?", (message_id,)
    ).fetchone()
    return None if row is None else stored_message(row)


def is_tombstoned(conn: sqlite3.Connection, key: bytes, message_id: str) -> bool:
    found = conn.execute(
        "SELECT 1 FROM tombstones WHERE hash = ?", (tombstone_hash(key, message_id),)
    ).fetchone()
    return found is not None


def erase_message(
    conn: sqlite3.Connection, indexer: SearchIndexer, key: bytes, message_id: str, now: str
) -> Erasure:
    with write_transaction(conn):
        gone = conn.execute(
            "DELETE FROM messages WHERE message_id = ? RETURNING message_id", (message_id,)
        ).fetchall()
        buried = _bury(conn, key, [message_id], now, None) if gone else 0
        if gone:
            _forget_rejections(conn, [message_id])
        top = indexer.lower_watermark()
    indexer.settle(top)
    return Erasure(tombstone_hash(key, message_id).hex(), len(gone), buried)


def erase_number_step(
    conn: sqlite3.Connection,
    indexer: SearchIndexer,
    key: bytes,
    msisdn: str,
    after: int,
    now: str,
) -> tuple[int, int | None]:
    """Erase up to ERASE_STEP messages from or to `msisdn` among the ERASE_WINDOW rowids
    after `after`; returns (deleted, where the next step starts, or None when done)."""
    with write_transaction(conn):
        last: int = conn.execute("SELECT coalesce(max(rowid), 0) FROM messages").fetchone()[0]
        end = after + ERASE_WINDOW
        found = conn.execute(
            "SELECT rowid, message_id FROM messages WHERE rowid > ? AND rowid <= ?"
            " AND (from_msisdn = ? OR to_msisdn = ?) ORDER BY rowid LIMIT ?",
            (after, end, msisdn, msisdn, ERASE_STEP),
        ).fetchall()
        if found:
            conn.executemany("DELETE FROM messages WHERE rowid = ?", [(r,) for r, _ in found])
            _bury(conn, key, [message_id for _, message_id in found], now, None)
            _forget_rejections(conn, [message_id for _, message_id in found])
        top = indexer.lower_watermark()
    indexer.settle(top)
    if len(found) == ERASE_STEP:
        return len(found), found[-1][0]
    return len(found), (end if end < last else None)


def purge_batch(
    conn: sqlite3.Connection,
    indexer: SearchIndexer,
    key: bytes,
    *,
    cutoff: str,
    now: str,
    expires: str | None,
    limit: int,
) -> int:
    """Delete up to `limit` of the oldest messages received before `cutoff`; returns how
    many. Each leaves a tombstone until `expires` (None: no tombstone).

    A statement for the whole batch at each step, never one per row: each SQLite call
    hands the GIL to the event loop and, under load, waits up to its switch interval
    (5 ms) to get it back, with the write lock held. Row by row (a RETURNING row, an
    executemany row), a batch of 150 rows took 15 ms alone and 100 ms and more beside
    64 connections posting.
    """
    # Most rounds find nothing due: one index probe, no write transaction.
    if (
        conn.execute("SELECT 1 FROM messages WHERE created_at < ? LIMIT 1", (cutoff,)).fetchone()
        is None
    ):
        return 0
    with write_transaction(conn, durable=False):
        rowids, ids = conn.execute(
            "SELECT json_group_array(rowid), json_group_array(message_id) FROM"
            " (SELECT rowid, message_id FROM messages WHERE created_at < ?"
            " ORDER BY created_at LIMIT ?)",
            (cutoff, limit),
        ).fetchone()
        gone: list[str] = json.loads(ids)
        if not gone:
            return 0
        # The index entries wait for the indexer (SearchIndexer): deleting them here
        # would make each batch five times longer.
        conn.execute("UPDATE search_progress SET defer_deletes = 1 WHERE id = 1")
        indexer.defer_rowids(rowids)
        conn.execute(
            "DELETE FROM messages WHERE rowid IN (SELECT value FROM json_each(?))", (rowids,)
        )
        conn.execute("UPDATE search_progress SET defer_deletes = 0 WHERE id = 1")
        if expires is not None:
            _bury(conn, key, gone, now, expires)
        top = indexer.lower_watermark()
    indexer.settle(top)
    return len(gone)


def expire_tombstones(conn: sqlite3.Connection, now: str, limit: int) -> int:
    due = conn.execute(
        "SELECT 1 FROM tombstones WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT 1", (now,)
    ).fetchone()
    if due is None:
        return 0
    with write_transaction(conn, durable=False):
        cursor = conn.execute(
            "DELETE FROM tombstones WHERE hash IN (SELECT hash FROM tombstones"
            " WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?)",
            (now, limit),
        )
    return cursor.rowcount


def import_batch(
    conn: sqlite3.Connection,
    writer: Writer,
    key: bytes,
    rows: Sequence[tuple[Row, str]],
    durable: bool,
) -> ImportCounts:
    """Insert (row, received_at) pairs unless already stored or tombstoned, in one
    transaction, by the same statement as the webhook's inserts (MAX_BATCH rows each).

    Without a feed position: the messages_position_default trigger gives each row the
    next one under the write lock, so they are in commit order even when this runs in
    another process than the service (`python -m app import`), whose writer then starts
    past them (docs/feed.md).
    """
    hashes = [tombstone_hash(key, row[0]) for row, _ in rows]
    created = buried = last_rowid = 0
    with write_transaction(conn, durable=durable):
        for start in range(0, len(rows), MAX_BATCH):
            chunk = hashes[start : start + MAX_BATCH]
            buried += conn.execute(
                f"SELECT count(*) FROM tombstones WHERE hash IN ({', '.join('?' * len(chunk))})",
                chunk,
            ).fetchone()[0]
            params = [
                value
                for (row, received), hashed in zip(
                    rows[start : start + MAX_BATCH], chunk, strict=True
                )
                for value in (*row, received, None, hashed)
            ]
            cursor = conn.execute(insert_group(len(chunk)), params)
            if cursor.rowcount > 0:
                created += cursor.rowcount
                last_rowid = max(last_rowid, cursor.lastrowid or 0)
        top = conn.execute("SELECT coalesce(max(position), 0) FROM messages").fetchone()[0]
    writer.search.last_rowid = max(writer.search.last_rowid, last_rowid)
    if created:
        writer.next_position = max(writer.next_position, top + 1)
        writer.announce(top)
    return ImportCounts(created, len(rows) - created - buried, buried)


def export_page(
    conn: sqlite3.Connection, query: ListQuery, after: tuple[str, str] | None, limit: int
) -> list[Row]:
    """Up to `limit` rows matching the /messages filters, in listing order, after `after`
    (ts_key, message_id); each row is EXPORT_COLUMNS then ts_key."""
    sql, params = _export_statement(query, after)
    return conn.execute(sql + " LIMIT ?", [*params, limit]).fetchall()


def export_all(conn: sqlite3.Connection, query: ListQuery, chunk: int) -> Iterator[list[Row]]:
    """Every matching row, `chunk` at a time, from one read transaction: one snapshot."""
    sql, params = _export_statement(query, None)
    conn.execute("BEGIN")
    try:
        cursor = conn.execute(sql, params)
        while rows := cursor.fetchmany(chunk):
            yield rows
    finally:
        rollback(conn)


def _export_statement(query: ListQuery, after: tuple[str, str] | None) -> tuple[str, list[Any]]:
    clauses, params = list_filters(query)
    if after is not None:
        clauses.append("(ts_key, message_id) > (?, ?)")
        params.extend(after)
    where = " WHERE " + " AND ".join(clauses) if clauses else ""
    sql = f"SELECT {EXPORT_COLUMNS}, ts_key FROM messages{where} ORDER BY ts_key, message_id"
    return sql, params


class SQLiteLifecycle:
    """The store's lifecycle operations (MessageStore.lifecycle) on SQLite."""

    def __init__(
        self, read: RunOn, write: RunOn, writer: Writer, *, key: bytes, clock: Clock
    ) -> None:
        self._read = read
        self._write = write
        self._writer = writer
        self._search = writer.search
        self._key = key
        self._clock = clock

    async def get_message(self, message_id: str) -> StoredMessage | None:
        return await self._read(lambda conn: get_message(conn, message_id))

    async def is_tombstoned(self, message_id: str) -> bool:
        return await self._read(lambda conn: is_tombstoned(conn, self._key, message_id))

    async def erase_message(self, message_id: str) -> Erasure:
        search, key, now = self._search, self._key, self._now()
        return await self._write(lambda conn: erase_message(conn, search, key, message_id, now))

    async def erase_number(self, msisdn: str) -> Erasure:
        # Window by window, each its own short transaction on the writer.
        search, key, now = self._search, self._key, self._now()
        deleted = 0
        after: int | None = 0
        while after is not None:
            step, after = await self._write(
                functools.partial(
                    erase_number_step, indexer=search, key=key, msisdn=msisdn, after=after, now=now
                )
            )
            deleted += step
        return Erasure(number_digest(key, msisdn), deleted, deleted)

    async def purge(self, older_than: timedelta, tombstone_for: timedelta, limit: int) -> int:
        search, key, moment = self._search, self._key, self._clock()
        cutoff, now = format_instant(moment - older_than), format_instant(moment)
        expires = format_instant(moment + tombstone_for) if tombstone_for else None
        return await self._write(
            lambda conn: purge_batch(
                conn, search, key, cutoff=cutoff, now=now, expires=expires, limit=limit
            )
        )

    async def expire_tombstones(self, limit: int) -> int:
        now = self._now()
        return await self._write(lambda conn: expire_tombstones(conn, now, limit))

    async def export(self, query: ListQuery) -> AsyncIterator[list[Row]]:
        # Page by page, each page its own read: no transaction stays open between pages.
        after: tuple[str, str] | None = None
        while True:
            rows = await self._read(
                functools.partial(export_page, query=query, after=after, limit=EXPORT_PAGE)
            )
            if rows:
                yield [row[:-1] for row in rows]
            if len(rows) < EXPORT_PAGE:
                return
            after = (rows[-1][-1], rows[-1][0])

    async def import_rows(self, rows: Sequence[ImportRow], *, durable: bool = True) -> ImportCounts:
        writer, key, now = self._writer, self._key, self._now()
        prepared = [(message_row(message), received or now) for message, received in rows]
        return await self._write(lambda conn: import_batch(conn, writer, key, prepared, durable))

    def _now(self) -> str:
        return format_instant(self._clock())
