"""What the PostgreSQL store runs for the console: conversations, the timeline, rejections.

Each read is one statement, so one snapshot: folded aggregates and pending deltas are
added up exactly, as for /stats (see schema/postgres/0003_console.sql).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg

from app.records import (
    KEY_LENGTH,
    ConversationPage,
    Refusal,
    RejectionPage,
    StoredContent,
    TimelineRange,
)
from app.storage.rows import REJECTION_COLUMNS, build_conversations, build_rejections

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection = PoolConnectionProxy[asyncpg.Record]

# A sender with pending deltas is taken from the messages index (`fresh`); every other
# sender's folded row is exact (`settled`), read from sender_counts_by_recency in order.
# The true page is the first rows of both together.
_CONVERSATIONS = """
WITH pending AS (
  SELECT from_msisdn, sum(delta)::BIGINT AS delta FROM message_count_deltas GROUP BY from_msisdn
), fresh AS (
  SELECT p.from_msisdn, coalesce(s.count, 0) + p.delta AS count,
         l.ts_key AS last_ts_key, l.message_id AS last_message_id
    FROM pending p LEFT JOIN sender_counts s USING (from_msisdn)
    CROSS JOIN LATERAL (
      SELECT m.ts_key, m.message_id FROM messages m WHERE m.from_msisdn = p.from_msisdn
       ORDER BY m.ts_key DESC, m.message_id DESC LIMIT 1) AS l
), settled AS (
  SELECT s.from_msisdn, s.count, s.last_ts_key, s.last_message_id FROM sender_counts s
   WHERE s.last_ts_key IS NOT NULL {settled_after}
     AND NOT EXISTS (SELECT 1 FROM pending p WHERE p.from_msisdn = s.from_msisdn)
   ORDER BY s.last_ts_key DESC, s.last_message_id DESC LIMIT $1
), page AS (
  SELECT from_msisdn, count, last_ts_key, last_message_id FROM settled
  UNION ALL
  SELECT from_msisdn, count, last_ts_key, last_message_id FROM fresh
   WHERE count > 0 {fresh_after}
  ORDER BY last_ts_key DESC, last_message_id DESC LIMIT $1
)
SELECT page.from_msisdn, page.count, page.last_ts_key, m.message_id, m.to_msisdn, m.ts, m.text,
       (SELECT f.ts FROM messages f WHERE f.from_msisdn = page.from_msisdn
         ORDER BY f.ts_key, f.message_id LIMIT 1) AS first_ts
  FROM page JOIN messages m ON m.message_id = page.last_message_id
 ORDER BY page.last_ts_key DESC, page.last_message_id DESC
"""
_AFTER = "AND ({table}.last_ts_key, {table}.last_message_id) < ($2, $3)"
CONVERSATIONS_FIRST = _CONVERSATIONS.format(settled_after="", fresh_after="")
CONVERSATIONS_AFTER = _CONVERSATIONS.format(
    settled_after=_AFTER.format(table="s"), fresh_after=_AFTER.format(table="fresh")
)
TIMELINE = """
SELECT substr(hour, 1, $3) AS bucket, sum(count)::BIGINT FROM (
  SELECT hour, count FROM message_hours WHERE hour >= $1 AND hour < $2
  UNION ALL
  SELECT hour, delta FROM message_hour_deltas WHERE hour >= $1 AND hour < $2
) AS h GROUP BY 1 HAVING sum(count) <> 0
"""
REJECTIONS_FIRST = f"SELECT {REJECTION_COLUMNS} FROM rejections ORDER BY id DESC LIMIT $1"
REJECTIONS_BEFORE = (
    f"SELECT {REJECTION_COLUMNS} FROM rejections WHERE id < $2 ORDER BY id DESC LIMIT $1"
)
INSERT_REJECTIONS = (
    "INSERT INTO rejections (at, endpoint, reason, field, remote, body_bytes, message_id,"
    " request_id) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],"
    " $5::text[], $6::bigint[], $7::text[], $8::text[])"
)
PRUNE_REJECTIONS = (
    "DELETE FROM rejections WHERE id < ("
    "SELECT id FROM rejections ORDER BY id DESC OFFSET $1 LIMIT 1)"
)
STORED_CONTENTS = (
    "SELECT message_id, from_msisdn, to_msisdn, ts_key, text FROM messages"
    " WHERE message_id = ANY($1::text[])"
)


async def conversations_page(
    conn: Connection, limit: int, after: tuple[str, str] | None
) -> ConversationPage:
    if after is None:
        records = await conn.fetch(CONVERSATIONS_FIRST, limit + 1)
    else:
        records = await conn.fetch(CONVERSATIONS_AFTER, limit + 1, *after)
    return build_conversations([tuple(record) for record in records], limit)


async def timeline_counts(conn: Connection, span: TimelineRange) -> dict[str, int]:
    records = await conn.fetch(TIMELINE, span.start_hour, span.end_hour, KEY_LENGTH[span.bucket])
    return {record[0]: int(record[1]) for record in records}


async def rejections_page(conn: Connection, limit: int, before: int | None) -> RejectionPage:
    if before is None:
        records = await conn.fetch(REJECTIONS_FIRST, limit + 1)
    else:
        records = await conn.fetch(REJECTIONS_BEFORE, limit + 1, before)
    return build_rejections([tuple(record) for record in records], limit)


async def write_rejections(conn: Connection, refusals: Sequence[Refusal], keep: int) -> None:
    if not refusals:
        return
    columns = [list(column) for column in zip(*refusals, strict=True)]
    async with conn.transaction():
        # Diagnostics: not worth waiting for the WAL flush.
        await conn.execute("SET LOCAL synchronous_commit = off")
        await conn.execute(INSERT_REJECTIONS, *columns)
        await conn.execute(PRUNE_REJECTIONS, keep - 1)


async def stored_contents(conn: Connection, ids: Sequence[str]) -> dict[str, StoredContent]:
    records = await conn.fetch(STORED_CONTENTS, list(ids))
    return {record[0]: (record[1], record[2], record[3], record[4]) for record in records}
