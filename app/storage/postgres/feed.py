"""The feed on PostgreSQL: the horizon query, and the channel that wakes every replica.

Positions are `(xid8 << 16) + ordinal` (app/storage/postgres/sql.py). Transactions
commit in any order, so "position > last" alone would skip a row whose transaction
commits after a later one was read. The feed therefore hands out, in one statement (one
snapshot), only rows below `pg_snapshot_xmin(pg_current_snapshot()) << 16`: every
transaction with an xid below the snapshot's xmin has finished, so no row can appear
below that horizon later. Rows above it wait, a few milliseconds under load, for the
older transactions still in flight (docs/feed.md has the caveats).

Wake-ups: after each commit the inserting replica wakes its own readers at once and
sends a coalesced `NOTIFY` on a connection of its own, outside the insert transaction
(a NOTIFY inside it would serialise the commits of all notifying transactions); every
replica LISTENs on that same connection, reconnecting with backoff when the database
restarts. Readers also poll on a timer, so a lost notification costs latency, not rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from app.models import FeedQuery
from app.storage.feed import FeedBatch, FeedSignal

logger = logging.getLogger("app.storage")

CHANNEL = "webhook_feed"
# At most one NOTIFY per this many seconds per replica: under load, one per group of
# commits rather than one per commit.
NOTIFY_INTERVAL_SECONDS = 0.005
RECONNECT_MAX_SECONDS = 5.0
CONNECT_TIMEOUT_SECONDS = 5.0
CHANNEL_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

_HORIZON = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 16"
_COLUMNS = "position, message_id, from_msisdn, to_msisdn, ts, text, created_at"


def feed_statement(query: FeedQuery) -> tuple[str, list[Any]]:
    """Settled rows after query.after, the horizon and the newest position: one snapshot."""
    args: list[Any] = [query.after, query.limit]
    sender = ""
    if query.sender is not None:
        args.append(query.sender)
        sender = " AND from_msisdn = $3"
    sql = (
        f"SELECT h.horizon, h.newest, {', '.join('m.' + c for c in _COLUMNS.split(', '))}"
        f" FROM (SELECT {_HORIZON} AS horizon,"
        " (SELECT max(position) FROM messages) AS newest) AS h"
        f" LEFT JOIN LATERAL (SELECT {_COLUMNS} FROM messages"
        f" WHERE position > $1 AND position < h.horizon{sender}"
        " ORDER BY position LIMIT $2) AS m ON true ORDER BY m.position"
    )
    return sql, args


# The newest position below the horizon, in the same snapshot as the horizon: everything
# up to it is visible now, and nothing can appear below the horizon later. Not the newest
# position: a row above the horizon may be followed by an older transaction's row below it.
HEAD_STATEMENT = f"SELECT coalesce(max(position), 0) FROM messages WHERE position < ({_HORIZON})"


def feed_batch(records: list[asyncpg.Record], query: FeedQuery) -> FeedBatch:
    horizon = int(records[0]["horizon"])
    newest = records[0]["newest"]
    rows = [tuple(record)[2:] for record in records if record["position"] is not None]
    # Not full: every row below the horizon that matches was read. (Not max'ed with
    # `after`: a client's `after` beyond the horizon settles nothing.)
    settled = int(rows[-1][0]) if len(rows) == query.limit else horizon - 1
    return FeedBatch(rows, settled, pending=newest is not None and newest > settled)


class FeedChannel:
    """One connection per replica for LISTEN and the coalesced NOTIFYs."""

    def __init__(self, url: str, signal: FeedSignal) -> None:
        self._url = url
        self._signal = signal
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._connected = asyncio.Event()
        self._to_send = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    async def open(cls, url: str, signal: FeedSignal) -> FeedChannel:
        channel = cls(url, signal)
        try:
            await channel._connect()
        except CHANNEL_ERRORS as exc:
            logger.warning("feed channel cannot connect; polling meanwhile", extra=_why(exc))
        channel._tasks = [
            asyncio.create_task(channel._stay_connected(), name="feed-listen"),
            asyncio.create_task(channel._send_notifications(), name="feed-notify"),
        ]
        return channel

    def committed(self) -> None:
        """Rows were committed here: wake this replica's readers, and the others soon."""
        self._signal.notify()
        self._to_send.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    def _heard(self, *_: object) -> None:
        self._signal.notify()

    async def _connect(self) -> None:
        conn = await asyncpg.connect(
            self._url,
            timeout=CONNECT_TIMEOUT_SECONDS,
            # A notification is a hint, not data: its commit need not wait for a WAL flush.
            server_settings={
                "synchronous_commit": "off",
                "application_name": "webhook-receiver-feed",
            },
        )
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(_setter(lost))
            await conn.add_listener(CHANNEL, self._heard)
        except BaseException:
            conn.terminate()
            raise
        self._conn, self._lost = conn, lost
        self._connected.set()

    async def _stay_connected(self) -> None:
        delay = 0.25
        while True:
            if self._conn is not None:
                await self._lost.wait()
                self._connected.clear()
                self._conn.terminate()
                self._conn = None
                logger.warning("feed channel lost; reconnecting")
            try:
                await self._connect()
            except CHANNEL_ERRORS as exc:
                logger.warning(
                    "feed channel cannot connect; polling meanwhile",
                    extra={**_why(exc), "retry_in": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_SECONDS)
                continue
            delay = 0.25
            # Whatever was committed while it was away: the readers look again.
            self._signal.notify()

    async def _send_notifications(self) -> None:
        while True:
            await self._to_send.wait()
            await self._connected.wait()
            self._to_send.clear()
            conn = self._conn
            if conn is None:
                continue
            try:
                await conn.execute(f"SELECT pg_notify('{CHANNEL}', '')")
            except CHANNEL_ERRORS:
                # The listener side notices the lost connection and reconnects; the
                # other replicas' timers cover this one notification.
                continue
            await asyncio.sleep(NOTIFY_INTERVAL_SECONDS)


def _why(exc: BaseException) -> dict[str, str]:
    return {"error": type(exc).__name__}


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    return lambda _: event.set()
