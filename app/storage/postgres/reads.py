"""What the PostgreSQL store runs on a read connection: pages, stats, the feed, readiness."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import asyncpg

from app.models import FeedQuery, ListQuery, MessagePage, SenderCount, Stats
from app.storage.base import StorageUnavailable
from app.storage.feed import FeedBatch
from app.storage.migrations import SCHEMA_VERSION
from app.storage.postgres.feed import HEAD_STATEMENT, feed_batch, feed_statement
from app.storage.postgres.sql import (
    CHECK_SCHEMA,
    PROBE_WRITE,
    SHORT_TERM_PLAN,
    STATS,
    list_statement,
    short_term,
)
from app.storage.rows import Row, build_page, utc_now

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection = PoolConnectionProxy[asyncpg.Record]


async def list_page(conn: Connection, query: ListQuery) -> MessagePage:
    sql, args = list_statement(query)
    if not short_term(query):
        records = await conn.fetch(sql, *args)
    else:
        # SET LOCAL lasts to the end of the transaction (a savepoint within the one a
        # read behind a pooler already runs in).
        async with conn.transaction():
            await conn.execute(SHORT_TERM_PLAN)
            records = await conn.fetch(sql, *args)
    total = int(records[0]["total"])
    rows = [tuple(record)[1:] for record in records if record["message_id"] is not None]
    return build_page(rows, total, query)


async def read_stats(conn: Connection) -> Stats:
    record = await conn.fetchrow(STATS)
    if record is None:
        raise StorageUnavailable("message_totals has no row")
    top = zip(record["top_senders"], record["top_counts"], strict=True)
    return Stats(
        total_messages=record["total"],
        senders_count=record["senders"],
        messages_per_sender=[SenderCount(from_=sender, count=count) for sender, count in top],
        first_message_ts=record["first_ts"],
        last_message_ts=record["last_ts"],
    )


async def read_feed(conn: Connection, query: FeedQuery) -> FeedBatch:
    sql, args = feed_statement(query)
    return feed_batch(list(await conn.fetch(sql, *args)), query)


async def read_head(conn: Connection) -> int:
    return int(await conn.fetchval(HEAD_STATEMENT))


async def check_schema(conn: Connection, *, write: bool) -> int | None:
    """The schema version (None: no schema); `write`: prove that writes work, too."""
    version, _ = await conn.fetchrow(CHECK_SCHEMA) or (None, None)
    if version == SCHEMA_VERSION and write:
        await conn.execute(PROBE_WRITE, utc_now())
    return None if version is None else int(version)


async def read_only_query(conn: Connection, sql: str, params: Sequence[Any]) -> list[Row]:
    if not sql.lstrip().lower().startswith(("select", "with", "show")):
        raise ValueError("query() runs read-only statements only")
    async with conn.transaction(readonly=True):
        return [tuple(record) for record in await conn.fetch(sql, *params)]
