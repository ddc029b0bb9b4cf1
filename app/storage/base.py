"""What every message store offers, the errors a store raises, and which reads are scans."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import Protocol

from app.models import FeedQuery, ListQuery, Message, MessagePage, Stats, StoredMessage
from app.records import ConversationPage, Refusal, RejectionPage, StoredContent, TimelineRange
from app.storage.feed import FeedBatch, FeedSignal
from app.storage.lifecycle import Erasure, ImportCounts, ImportRow
from app.storage.rows import Row


class StorageUnavailable(Exception):
    """The database cannot serve this request now (locked, full, read-only, gone).

    The message is for logs; clients get a generic 503 with Retry-After.
    """


class Lifecycle(Protocol):
    """Retention, erasure, export and import (docs/lifecycle.md): MessageStore.lifecycle."""

    async def get_message(self, message_id: str) -> StoredMessage | None: ...

    async def erase_message(self, message_id: str) -> Erasure:
        """Delete one message and leave its tombstone (deleted 0: there was none)."""
        ...

    async def erase_number(self, msisdn: str) -> Erasure:
        """Delete every message from or to `msisdn`, each leaving a tombstone."""
        ...

    async def purge(self, older_than: timedelta, tombstone_for: timedelta, limit: int) -> int:
        """Delete up to `limit` of the oldest messages received more than `older_than`
        ago, each leaving a tombstone for `tombstone_for` (zero: none); how many."""
        ...

    async def expire_tombstones(self, limit: int) -> int:
        """Delete up to `limit` expired tombstones; how many."""
        ...

    def export(self, query: ListQuery) -> AsyncIterator[list[Row]]:
        """Every message the filters of `query` match, in listing order, page by page;
        rows of (message_id, from, to, ts, text, received_at)."""
        ...

    async def import_rows(self, rows: Sequence[ImportRow], *, durable: bool = True) -> ImportCounts:
        """Store (message, received_at or None for now) unless already stored or erased.

        durable=False commits without waiting for the disk: a later durable commit (the
        last batch of an import) makes it durable too.
        """
        ...

    async def is_tombstoned(self, message_id: str) -> bool: ...


class QueryTooExpensive(StorageUnavailable):
    """A read ran, or waited for a scan slot, past its deadline (READ_TIMEOUT_SECONDS).

    It was stopped (the database stops working on it too). Clients get a 503 that says
    the query was too expensive; a StorageUnavailable handler still answers it as a 503.
    """


# A `q` shorter than a trigram cannot use either backend's search index, and an offset
# is walked entry by entry: such reads cost what the table holds, not what they return.
TRIGRAM = 3
SCAN_OFFSET = 10_000


def is_scan(query: ListQuery) -> bool:
    """Whether a /messages query reads past what its page needs (a scan, in effect)."""
    short_q = query.q is not None and len(query.q.casefold()) < TRIGRAM
    return short_q or query.offset > SCAN_OFFSET


class MessageStore(Protocol):
    @property
    def lifecycle(self) -> Lifecycle: ...

    async def insert(self, message: Message) -> bool:
        """Store the message unless its message_id is already stored; True if it was new."""
        ...

    async def insert_many(self, messages: Sequence[Message]) -> list[bool | StorageUnavailable]:
        """insert() for each message, all at once and in few transactions (a batch).

        The outcome of each, in order: True if new, False if already stored, or the
        StorageUnavailable that kept it out. Cheaper than one insert() task per message.
        """
        ...

    async def list_messages(self, query: ListQuery) -> MessagePage: ...

    async def stats(self) -> Stats: ...

    async def read_feed(self, query: FeedQuery) -> FeedBatch:
        """Rows with position > query.after in position order, never one that could be
        followed by a lower position later (docs/feed.md)."""
        ...

    async def feed_head(self) -> int:
        """The highest position a consumer can read now (0 if none): following the feed
        from it misses nothing, and the feed after it holds nothing yet (docs/feed.md)."""
        ...

    @property
    def feed_signal(self) -> FeedSignal:
        """Notified on the event loop whenever rows may have become readable."""

    async def conversations(self, limit: int, after: tuple[str, str] | None) -> ConversationPage:
        """Senders, most recent last message first; `after` is the previous page's last
        (last ts_key, last message_id)."""
        ...

    async def timeline(self, span: TimelineRange) -> dict[str, int]:
        """Messages per bucket of `span` that has any, keyed like span.key()."""
        ...

    async def rejections(self, limit: int, before: int | None) -> RejectionPage:
        """Refused deliveries, newest first, with ids below `before` if given."""
        ...

    async def record_rejections(self, refusals: Sequence[Refusal], keep: int) -> None:
        """Append refusals, keeping only the newest `keep` rows."""
        ...

    async def stored_contents(self, ids: Sequence[str]) -> dict[str, StoredContent]:
        """(from, to, ts_key, text) of the stored messages among `ids`, by id."""
        ...

    async def ping(self) -> None:
        """Raise StorageUnavailable unless the database answers, has our schema and writes."""
        ...

    async def close(self) -> None: ...
