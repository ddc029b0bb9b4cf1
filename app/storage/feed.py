"""What every store shares for the feed: a page of rows with its horizon, and the signal
that new rows were committed (docs/feed.md)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

# (position, message_id, from, to, ts, text, created_at): a feed row, in this order.
FeedRow = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class FeedBatch:
    """Rows with position > after, in position order, and how far they are complete.

    `settled`: every row with a position up to it that will ever be visible is visible
    now, and those that matched are in `rows` (all of them below it, when the page is
    not full). A reader may go on from `settled` without missing anything. `pending`:
    rows were committed beyond it, which a moment from now will be settled (PostgreSQL,
    while older transactions are still in flight): worth reading again soon.
    """

    rows: list[FeedRow]
    settled: int
    pending: bool = False


class FeedSignal:
    """Wakes whoever waits for new rows: the fan-out's tail reader and long polls.

    A generation counter rather than an Event: a waiter passes the generation it last
    saw and returns at once if a commit came in between, so nothing is missed while it
    was reading. Lives on the event loop; notify() must be called from it.
    """

    def __init__(self) -> None:
        self.generation = 0
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        self.generation += 1
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, seen: int, timeout: float) -> bool:
        """Wait until the generation moves past `seen`, at most `timeout` s; True if it did."""
        if self.generation != seen:
            return True
        if timeout <= 0:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            return False
        finally:
            if waiter in self._waiters and not waiter.done():
                self._waiters.remove(waiter)
        return True
