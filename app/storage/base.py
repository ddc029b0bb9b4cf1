"""What every message store offers, and the one error a store raises to its callers."""

from __future__ import annotations

from typing import Protocol

from app.models import ListQuery, Message, MessagePage, Stats


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
