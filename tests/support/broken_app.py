"""Deliberately broken builds of the service, to prove the reliability tests can fail.

Test-only, never shipped: a test starts `uvicorn --factory tests.support.broken_app:create_app` with
BROKEN_VARIANT set, and this module wraps the real store in that server process. The
service itself has no setting that does any of this.

- `ack_before_commit`: answers 200 at once and commits a moment later (write-behind).
- `read_then_write`: looks for the id first, then inserts without ON CONFLICT.
- `internal_error`: every store call raises an exception whose message quotes data.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Sequence

from fastapi import FastAPI

import app.main
from app.config import Settings
from app.models import FeedQuery, ListQuery, Message, MessagePage, Stats
from app.records import (
    ConversationPage,
    Refusal,
    RejectionPage,
    StoredContent,
    TimelineRange,
)
from app.storage import Lifecycle, MessageStore, SQLiteStore, StorageUnavailable, open_store
from app.storage.feed import FeedBatch, FeedSignal
from app.storage.rows import message_row, utc_now

# What the internal_error variant's exceptions say: nothing of it may reach a client or a log.
LEAKY_DETAIL = "internal-detail-+919876543210-private-text"


class DelegatingStore:
    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    @property
    def lifecycle(self) -> Lifecycle:
        return self.store.lifecycle

    async def insert(self, message: Message) -> bool:
        return await self.store.insert(message)

    async def insert_many(self, messages: Sequence[Message]) -> list[bool | StorageUnavailable]:
        # Through insert(), one by one: a broken insert() breaks batches as well.
        outcomes = await asyncio.gather(*map(self.insert, messages), return_exceptions=True)
        kept: list[bool | StorageUnavailable] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, StorageUnavailable):
                raise outcome
            kept.append(outcome)
        return kept

    async def list_messages(self, query: ListQuery) -> MessagePage:
        return await self.store.list_messages(query)

    async def stats(self) -> Stats:
        return await self.store.stats()

    async def read_feed(self, query: FeedQuery) -> FeedBatch:
        return await self.store.read_feed(query)

    async def feed_head(self) -> int:
        return await self.store.feed_head()

    @property
    def feed_signal(self) -> FeedSignal:
        return self.store.feed_signal

    async def conversations(self, limit: int, after: tuple[str, str] | None) -> ConversationPage:
        return await self.store.conversations(limit, after)

    async def timeline(self, span: TimelineRange) -> dict[str, int]:
        return await self.store.timeline(span)

    async def rejections(self, limit: int, before: int | None) -> RejectionPage:
        return await self.store.rejections(limit, before)

    async def record_rejections(self, refusals: Sequence[Refusal], keep: int) -> None:
        await self.store.record_rejections(refusals, keep)

    async def stored_contents(self, ids: Sequence[str]) -> dict[str, StoredContent]:
        return await self.store.stored_contents(ids)

    async def ping(self) -> None:
        await self.store.ping()

    async def close(self) -> None:
        await self.store.close()


class AckBeforeCommitStore(DelegatingStore):
    """Write-behind: the 200 goes out before the row is committed."""

    def __init__(self, store: SQLiteStore) -> None:
        super().__init__(store)
        self.pending: set[asyncio.Task[bool]] = set()

    async def insert(self, message: Message) -> bool:
        async def later() -> bool:
            await asyncio.sleep(0.05)
            return await self.store.insert(message)

        task = asyncio.create_task(later())
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return True


class ReadThenWriteStore(DelegatingStore):
    """Idempotency by a read before the write: two concurrent deliveries both see no row."""

    async def insert(self, message: Message) -> bool:
        found = await self.store.query(
            "SELECT 1 FROM messages WHERE message_id = ?", (message.message_id,)
        )
        if found:
            return False
        row = (*message_row(message), utc_now())

        def write(conn: sqlite3.Connection) -> bool:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "INSERT INTO messages (message_id, from_msisdn, to_msisdn, ts, text, ts_key,"
                    " text_folded, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            return True

        return await self.store._write_call(write)


class InternalErrorStore(DelegatingStore):
    async def insert(self, message: Message) -> bool:
        raise RuntimeError(LEAKY_DETAIL)

    async def list_messages(self, query: ListQuery) -> MessagePage:
        raise RuntimeError(LEAKY_DETAIL)

    async def stats(self) -> Stats:
        raise RuntimeError(LEAKY_DETAIL)


VARIANTS: dict[str, type[DelegatingStore]] = {
    "ack_before_commit": AckBeforeCommitStore,
    "read_then_write": ReadThenWriteStore,
    "internal_error": InternalErrorStore,
}


def create_app(settings: Settings | None = None) -> FastAPI:
    wrapper = VARIANTS[os.environ["BROKEN_VARIANT"]]

    async def open_broken_store(settings: Settings) -> MessageStore:
        store = await open_store(settings)
        assert isinstance(store, SQLiteStore)
        return wrapper(store)

    return app.main.create_app(settings, store_opener=open_broken_store)
