"""What every message store offers, and the one error a store raises to its callers."""

from __future__ import annotations

from typing import Protocol

from app.models import FeedQuery, ListQuery, Message, MessagePage, Stats
from app.storage.feed import FeedBatch, FeedSignal


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

    async def read_feed(self, query: FeedQuery) -> FeedBatch:
        """Rows with position > query.after in position order, never one that could be
        followed by a lower position later (docs/feed.md)."""
        ...

    @property
    def feed_signal(self) -> FeedSignal:
        """Notified on the event loop whenever rows may have become readable."""
        ...

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the database answers, has our schema and writes."""
        ...

    async def close(self) -> None: ...
