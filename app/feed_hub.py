"""The feed's wire format, and its fan-out: one tail reader per process for every stream.

A thousand subscribers must not mean a thousand queries per commit. One task per
process (the hub) follows the store: on each wake-up it reads the new rows after its
tail, in pages, encodes each event once, joins the batch into one bytes object and hands
that same object to every subscriber's queue: one write per subscriber per wake-up,
however many events it carries. Wake-ups come from the store's FeedSignal (SQLite: the
writer after each commit; PostgreSQL: this replica's commits and the others' NOTIFYs),
with a poll every POLL_SECONDS as a fallback.

A subscriber's queue is bounded in bytes: a consumer that falls SUBSCRIBER_BUFFER_BYTES
behind is dropped (its stream ends; it resumes from its last id), never buffered without
bound. The chunks are shared, so the memory the queues hold is at most the bytes of the
newest events, whatever the number of subscribers.

A subscriber that starts behind catches up with its own paged reads, then joins the hub
without a gap or a repeat: the hub keeps its last RING_BYTES of events, covering
positions (floor, tail]; a subscriber whose reads have settled everything up to the
floor or beyond joins synchronously (no await between the check and the join) and is
handed the ring's events after its last one (docs/feed.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from app.models import FeedQuery
from app.storage import MessageStore, StorageUnavailable
from app.storage.feed import FeedBatch, FeedRow
from app.tasks import cancel_and_wait

logger = logging.getLogger("app.feed")

PAGE_SIZE = 1000
SUBSCRIBER_BUFFER_BYTES = 4 * 1024 * 1024
RING_BYTES = 4 * 1024 * 1024
POLL_SECONDS = 1.0
# When rows are committed beyond the horizon (PostgreSQL, older transactions in flight),
# read again this soon rather than waiting for the next notification.
PENDING_POLL_SECONDS = 0.02
# With many subscribers, wake-ups are spaced by up to this much, so that each write
# carries more events (see _spacing).
MAX_SPACING_SECONDS = 0.05
SPACING_PER_SUBSCRIBER_SECONDS = 0.00005
RETRY_MS = 1000
# The most a stream hands the server at once. A write is accepted whole, however full the
# socket, and stays in the server's buffer for as long as the client does not read: in
# pieces this size, a stalled client pins one piece, not a whole catch-up page.
MAX_WRITE_BYTES = 64 * 1024

_EVENT = b"id: %d\nevent: message\ndata: %b\n\n"
PREAMBLE = b"retry: %d\n\n" % RETRY_MS


def feed_item(row: FeedRow) -> dict[str, Any]:
    return {
        "position": row[0],
        "message_id": row[1],
        "from": row[2],
        "to": row[3],
        "ts": row[4],
        "text": row[5],
        "received_at": row[6],
    }


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def feed_page(rows: Sequence[FeedRow], after: int) -> bytes:
    """The body of GET /feed: one json.dumps for the whole page."""
    next_after = rows[-1][0] if rows else after
    return _dumps({"data": [feed_item(row) for row in rows], "next_after": next_after})


def encode_events(rows: Sequence[FeedRow]) -> bytes:
    return b"".join(_EVENT % (row[0], _dumps(feed_item(row))) for row in rows)


# One encoded event: (position, sender, bytes).
Event = tuple[int, str, bytes]


class Subscriber:
    """One stream's queue: chunks of encoded events, bounded in bytes."""

    __slots__ = ("_chunks", "_pending", "_waiter", "after", "dropped", "limit", "on_drop", "sender")

    def __init__(
        self,
        after: int,
        sender: str | None,
        *,
        limit: int = SUBSCRIBER_BUFFER_BYTES,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        # Everything matching up to `after` has been handed over (or was not wanted).
        self.after = after
        self.sender = sender
        self.on_drop = on_drop
        self.dropped = False
        self.limit = limit
        self._chunks: list[bytes] = []
        self._pending = 0
        self._waiter: asyncio.Future[None] | None = None

    def push(self, chunk: bytes) -> bool:
        """Queue a chunk; False (and nothing queued) if that would pass the limit."""
        if self._pending + len(chunk) > self.limit:
            return False
        self._chunks.append(chunk)
        self._pending += len(chunk)
        self._wake()
        return True

    def end(self) -> None:
        """End the stream after what it has been handed (the server is shutting down)."""
        self.dropped = True
        self._wake()

    def drop(self) -> None:
        self.dropped = True
        self._chunks.clear()
        self._pending = 0
        self._wake()
        if self.on_drop is not None:
            self.on_drop()

    async def next_chunk(self) -> bytes | None:
        """Everything queued, as one chunk; None once dropped."""
        while not self._chunks and not self.dropped:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        if self.dropped:
            return None
        chunks, self._chunks, self._pending = self._chunks, [], 0
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class FeedHub:
    """The process's one tail reader and its subscribers."""

    def __init__(
        self,
        store: MessageStore,
        *,
        page_size: int = PAGE_SIZE,
        ring_bytes: int = RING_BYTES,
        subscriber_buffer_bytes: int = SUBSCRIBER_BUFFER_BYTES,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self.store = store
        self.page_size = page_size
        self.subscriber_buffer_bytes = subscriber_buffer_bytes
        self._ring_bytes = ring_bytes
        self._poll = poll_seconds
        self._subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None
        # Every row up to _tail has been handed out; the ring holds the events of
        # (floor, _tail] as batches of (the tail before it, its events, its size).
        self._tail = 0
        self._ring: deque[tuple[int, list[Event], int]] = deque()
        self._ring_size = 0
        self._closed = False
        # For the metrics: open streams (catching up or following the tail), and
        # subscribers dropped for falling too far behind since start-up.
        self.streams = 0
        self.dropped_slow = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def _floor(self) -> int:
        return self._ring[0][0] if self._ring else self._tail

    def try_join(self, subscriber: Subscriber, settled: int | None) -> bool:
        """Join the live tail if nothing between the subscriber and it can be missed.

        `settled`: how far the subscriber's own reads have settled the feed (None before
        its first read). Synchronous on purpose: nothing may run between the check and
        the join.
        """
        if self._closed:
            subscriber.drop()
            return True
        if not self.running:
            if settled is None:
                return False  # only a real read may start the tail, never a client's `after`
            self._tail = settled
            self._ring.clear()
            self._ring_size = 0
            self._subscribers.add(subscriber)
            self._task = asyncio.create_task(self._run(), name="feed-hub")
            return True
        floor = self._floor()
        if subscriber.after < floor and (settled is None or settled < floor):
            return False
        backlog = [
            event
            for _, events, _ in self._ring
            if events[-1][0] > subscriber.after
            for event in events
            if event[0] > subscriber.after
            and (subscriber.sender is None or event[1] == subscriber.sender)
        ]
        subscriber.after = max(subscriber.after, self._tail)
        self._subscribers.add(subscriber)
        if backlog and not subscriber.push(b"".join(event[2] for event in backlog)):
            self.leave(subscriber)
            self._too_slow(subscriber)
        return True

    def leave(self, subscriber: Subscriber) -> None:
        self._subscribers.discard(subscriber)

    async def stream(self, subscriber: Subscriber) -> AsyncGenerator[bytes]:
        """The stream's body: the preamble, the catch-up pages, then the live tail."""
        self.streams += 1
        try:
            yield PREAMBLE
            settled: int | None = None
            while not self.try_join(subscriber, settled):
                query = FeedQuery(
                    after=max(subscriber.after, settled or 0),
                    limit=self.page_size,
                    sender=subscriber.sender,
                )
                batch = await self.store.read_feed(query)
                settled = batch.settled
                if batch.rows:
                    subscriber.after = batch.rows[-1][0]
                    for piece in _pieces(encode_events(batch.rows)):
                        yield piece
            while True:
                chunk = await subscriber.next_chunk()
                if chunk is None:
                    return
                for piece in _pieces(chunk):
                    yield piece
        finally:
            self.streams -= 1
            self.leave(subscriber)

    async def close(self) -> None:
        self._closed = True
        for subscriber in list(self._subscribers):
            subscriber.drop()
        self._subscribers.clear()
        if self._task is not None:
            await cancel_and_wait(self._task)

    def _spacing(self) -> float:
        # Each wake-up costs a write per subscriber: with a thousand of them, a few tens
        # of milliseconds between wake-ups let each write carry many events.
        return min(MAX_SPACING_SECONDS, SPACING_PER_SUBSCRIBER_SECONDS * len(self._subscribers))

    async def _run(self) -> None:
        try:
            await self._follow()
        except Exception:
            # A bug, not the database (_follow waits that out): end every stream, so the
            # clients reconnect and a fresh tail starts, rather than hang.
            logger.exception("feed tail failed")
            for subscriber in list(self._subscribers):
                subscriber.drop()
            self._subscribers.clear()
        finally:
            self._ring.clear()
            self._ring_size = 0

    async def _follow(self) -> None:
        signal = self.store.feed_signal
        loop = asyncio.get_running_loop()
        seen = signal.generation
        timeout = 0.0  # read once at start: rows may have come since the joiner's read
        failing = False
        last = loop.time()
        while self._subscribers:
            await signal.wait(seen, timeout)
            spacing = self._spacing() - (loop.time() - last)
            if spacing > 0:
                await asyncio.sleep(spacing)
            last = loop.time()
            seen = signal.generation
            try:
                batch = await self._read_all()
            except StorageUnavailable as exc:
                if not failing:
                    logger.warning("feed tail cannot read", extra={"reason": str(exc)})
                failing = True
                timeout = self._poll
                continue
            failing = False
            timeout = PENDING_POLL_SECONDS if batch.pending else self._poll

    async def _read_all(self) -> FeedBatch:
        while True:
            batch = await self.store.read_feed(FeedQuery(after=self._tail, limit=self.page_size))
            self._publish(batch)
            if len(batch.rows) < self.page_size or not self._subscribers:
                return batch

    def _too_slow(self, subscriber: Subscriber) -> None:
        self.dropped_slow += 1
        logger.warning(
            "feed subscriber too slow; disconnected",
            extra={"position": subscriber.after, "buffer_bytes": subscriber.limit},
        )
        subscriber.drop()

    def _publish(self, batch: FeedBatch) -> None:
        rows = batch.rows
        before = self._tail
        self._tail = max(self._tail, batch.settled)
        if not rows:
            return
        events: list[Event] = [
            (row[0], row[2], _EVENT % (row[0], _dumps(feed_item(row)))) for row in rows
        ]
        first, last = events[0][0], events[-1][0]
        whole = b"".join(event[2] for event in events)
        by_sender: dict[str, bytes] = {}
        for subscriber in list(self._subscribers):
            sender = subscriber.sender
            if subscriber.after >= last:
                continue
            if subscriber.after < first and sender is None:
                chunk = whole
            elif subscriber.after < first and sender is not None:
                chunk = by_sender.get(sender, b"")
                if sender not in by_sender:
                    chunk = by_sender[sender] = b"".join(e[2] for e in events if e[1] == sender)
            else:
                chunk = b"".join(
                    e[2]
                    for e in events
                    if e[0] > subscriber.after and (sender is None or e[1] == sender)
                )
            subscriber.after = last
            if chunk and not subscriber.push(chunk):
                self._subscribers.discard(subscriber)
                self._too_slow(subscriber)
        self._ring.append((before, events, len(whole)))
        self._ring_size += len(whole)
        while self._ring_size > self._ring_bytes and len(self._ring) > 1:
            self._ring_size -= self._ring.popleft()[2]


def _pieces(chunk: bytes) -> list[bytes]:
    if len(chunk) <= MAX_WRITE_BYTES:
        return [chunk]
    return [chunk[i : i + MAX_WRITE_BYTES] for i in range(0, len(chunk), MAX_WRITE_BYTES)]


async def read_waiting(store: MessageStore, query: FeedQuery, wait: float) -> FeedBatch:
    """A feed read that, when nothing is there, waits up to `wait` s for something."""
    signal = store.feed_signal
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        seen = signal.generation
        batch = await store.read_feed(query)
        remaining = deadline - loop.time()
        if batch.rows or remaining <= 0:
            return batch
        await signal.wait(seen, min(remaining, PENDING_POLL_SECONDS if batch.pending else 1.0))
