"""PostgreSQL stores broken on purpose, to prove the race and crash tests can fail.

Each one makes a mistake a reasonable implementation could make, with the race window
held open so that the test meets it every time. The `*_app` factories run one in a real
server: `uvicorn --factory tests.support.broken_stores:read_then_insert_app`.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg
from fastapi import FastAPI

from app.config import Settings
from app.main import create_app
from app.models import FeedQuery, Message, Stats
from app.storage import MessageStore
from app.storage.feed import FeedBatch
from app.storage.postgres.lifecycle import bury
from app.storage.postgres.sql import INSERT_MANY
from app.storage.postgres.store import PostgresStore
from app.storage.rows import message_row, utc_now

_INSERT = (
    "INSERT INTO messages"
    " (message_id, from_msisdn, to_msisdn, ts, text, ts_key, text_folded, created_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (message_id) DO NOTHING"
)


class ReadThenInsert(PostgresStore):
    """Decides "new" from a read before the write: concurrent deliveries all look new."""

    async def insert(self, message: Message) -> bool:
        async def run(conn: Any) -> bool:
            seen = await conn.fetchval(
                "SELECT 1 FROM messages WHERE message_id = $1", message.message_id
            )
            await asyncio.sleep(0.05)  # another replica's read lands here
            await conn.execute(_INSERT, *message_row(message), utc_now())
            return seen is None

        return await self._with_connection(run, 5.0)


class AckBeforeCommit(PostgresStore):
    """Answers before the row is committed, and commits a little later."""

    pending: set[asyncio.Task[bool]]

    async def insert(self, message: Message) -> bool:
        async def later() -> bool:
            await asyncio.sleep(0.5)
            return await PostgresStore.insert(self, message)

        if not hasattr(self, "pending"):
            self.pending = set()
        task = asyncio.create_task(later())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return True


class TwoSnapshotStats(PostgresStore):
    """Adds the folded total and the pending deltas from two statements, not one snapshot."""

    first_read_done: asyncio.Event

    async def stats(self) -> Stats:
        self.first_read_done = asyncio.Event()

        async def run(conn: Any) -> int:
            folded = await conn.fetchval("SELECT total FROM message_totals WHERE id = 1")
            self.first_read_done.set()
            await asyncio.sleep(0.3)  # a fold commits here
            pending = await conn.fetchval(
                "SELECT coalesce(sum(delta), 0) FROM message_count_deltas"
            )
            return int(folded) + int(pending)

        total = await self._with_connection(run, 5.0)
        return Stats(
            total_messages=total,
            senders_count=0,
            messages_per_sender=[],
            first_message_ts=None,
            last_message_ts=None,
        )


class SlowCommits(PostgresStore):
    """Not broken: holds each insert's transaction open a random while after the INSERT,
    so that commits finish far out of position order (as they may under load)."""

    async def _insert_rows(
        self, conn: Any, columns: list[list[Any]], hashes: list[bytes], now: str
    ) -> list[Any]:
        async with conn.transaction():
            records: list[asyncpg.Record] = await conn.fetch(
                INSERT_MANY, *columns, hashes, [now] * len(hashes)
            )
            await asyncio.sleep(random.uniform(0, 0.03))
        return records


class FeedWithoutHorizon(SlowCommits):
    """Hands out `position > after` at once: a row whose transaction commits after a
    later one was read is skipped for good."""

    async def read_feed(self, query: FeedQuery) -> FeedBatch:
        sender = "" if query.sender is None else " AND from_msisdn = $3"
        args: list[Any] = [query.after, query.limit]
        if query.sender is not None:
            args.append(query.sender)

        async def run(conn: Any) -> list[Any]:
            return list(
                await conn.fetch(
                    "SELECT position, message_id, from_msisdn, to_msisdn, ts, text, created_at"
                    f" FROM messages WHERE position > $1{sender} ORDER BY position LIMIT $2",
                    *args,
                )
            )

        rows = [tuple(r) for r in await self._with_connection(run, 5.0)]
        return FeedBatch(rows, rows[-1][0] if rows else query.after)


def _app_with(store_class: type[PostgresStore]) -> FastAPI:
    async def open_store(settings: Settings) -> MessageStore:
        return await store_class.open(
            settings.database.target,
            pool_size=settings.database_pool_size,
            read_pool_size=settings.read_pool_size,
            write_timeout=settings.write_timeout_seconds,
            read_timeout=settings.read_timeout_seconds,
        )

    return create_app(store_opener=open_store)


def read_then_insert_app() -> FastAPI:
    return _app_with(ReadThenInsert)


def ack_before_commit_app() -> FastAPI:
    return _app_with(AckBeforeCommit)


def slow_commits_app() -> FastAPI:
    return _app_with(SlowCommits)


def feed_without_horizon_app() -> FastAPI:
    return _app_with(FeedWithoutHorizon)


async def erase_without_lock(conn: Any, key: bytes, message_id: str, now: str) -> int:
    """postgres_lifecycle.erase_message without its LOCK TABLE: a redelivery whose insert
    found the row being deleted waits for this transaction, then stores the row again."""
    async with conn.transaction():
        gone = await conn.fetchval(
            "DELETE FROM messages WHERE message_id = $1 RETURNING 1", message_id
        )
        if gone is None:
            return 0
        await bury(conn, key, [message_id], now, None)
    return 1
