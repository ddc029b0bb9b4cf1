"""The SQL the PostgreSQL store sends: statements, and the one built per /messages query."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.models import ListQuery
from app.storage.base import TRIGRAM

# Many rows in one statement (one transaction, one WAL flush); duplicates inside the batch
# are fine: the first is inserted, the others meet it and do nothing. The feed position is
# the transaction's xid8 << 16 plus the row's ordinal in the statement, which is unique
# because this is the only INSERT of its transaction: it always runs as one autocommit
# statement (docs/feed.md), or (an import) after nothing but a read. A duplicate burns its
# ordinal. $8 holds each row's tombstone hash: an erased or purged id is left out (see
# postgres/lifecycle.py for why an erasure running at the same moment cannot slip past
# this check); $9 each row's created_at.
INSERT_MANY = (
    "INSERT INTO messages"
    " (message_id, from_msisdn, to_msisdn, ts, text, ts_key, text_folded, created_at, position)"
    " SELECT r.message_id, r.from_msisdn, r.to_msisdn, r.ts, r.text, r.ts_key, r.text_folded,"
    " r.created_at, (pg_current_xact_id()::text::bigint << 16) + r.ordinal FROM unnest("
    "$1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],"
    " $8::bytea[], $9::text[]) WITH ORDINALITY AS r (message_id, from_msisdn, to_msisdn, ts,"
    " text, ts_key, text_folded, hash, created_at, ordinal)"
    " WHERE NOT EXISTS (SELECT 1 FROM tombstones t WHERE t.hash = r.hash)"
    " ON CONFLICT (message_id) DO NOTHING RETURNING message_id"
)
# Rows per statement at most; a bigger burst is sent as several. Below 2^16: the ordinal
# must fit beside the xid in a position.
MAX_BATCH = 256
_COLUMNS = "message_id, from_msisdn, to_msisdn, ts, text, ts_key, created_at"
_TOTAL = (
    "(SELECT total FROM message_totals WHERE id = 1)"
    " + (SELECT coalesce(sum(delta), 0) FROM message_count_deltas)"
)
# One statement, so one snapshot: folded counts and pending deltas are added up exactly.
# The true top 10 is among the folded top (10 + pending senders) and the pending
# senders: every other sender is below ten unchanged ones.
STATS = """
WITH pending AS (
  SELECT from_msisdn, sum(delta)::BIGINT AS delta FROM message_count_deltas GROUP BY from_msisdn
), folded AS (
  (SELECT from_msisdn, count FROM sender_counts
    ORDER BY count DESC, from_msisdn LIMIT 10 + (SELECT count(*) FROM pending))
  UNION
  SELECT s.from_msisdn, s.count FROM sender_counts s JOIN pending USING (from_msisdn)
), merged AS (
  SELECT from_msisdn, coalesce(f.count, 0) + coalesce(p.delta, 0) AS count
    FROM folded f FULL JOIN pending p USING (from_msisdn)
), top AS (
  SELECT from_msisdn, count FROM merged WHERE count > 0
   ORDER BY count DESC, from_msisdn LIMIT 10
)
SELECT
  t.total + (SELECT coalesce(sum(delta), 0) FROM pending)::BIGINT AS total,
  t.senders
    + (SELECT count(*) FROM merged m JOIN pending USING (from_msisdn) WHERE m.count > 0)
    - (SELECT count(*) FROM sender_counts s JOIN pending USING (from_msisdn)) AS senders,
  ARRAY(SELECT from_msisdn FROM top ORDER BY count DESC, from_msisdn) AS top_senders,
  ARRAY(SELECT count FROM top ORDER BY count DESC, from_msisdn) AS top_counts,
  (SELECT ts FROM messages ORDER BY ts_key, message_id LIMIT 1) AS first_ts,
  (SELECT ts FROM messages ORDER BY ts_key DESC, message_id DESC LIMIT 1) AS last_ts
FROM message_totals t WHERE t.id = 1
"""
CHECK_SCHEMA = (
    "SELECT (SELECT max(version) FROM schema_version),"
    " (SELECT count(*) FROM (SELECT 1 FROM messages LIMIT 0) AS present)"
)
HAS_TRIGRAM_INDEX = (
    "SELECT EXISTS (SELECT 1 FROM pg_indexes"
    " WHERE tablename = 'messages' AND indexname = 'messages_text_trgm'"
    " AND schemaname = current_schema())"
)
PROBE_WRITE = (
    "INSERT INTO write_probe (id, at) VALUES (1, $1)"
    " ON CONFLICT (id) DO UPDATE SET at = excluded.at"
)


def like_pattern(folded: str) -> str:
    """A LIKE pattern for `folded` anywhere, with `%`, `_` and `\\` taken literally."""
    escaped = folded.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


# For a page of a short term: no walk of an index in the page's order. The planner
# guesses that a third of the rows match, so it walked (ts_key, message_id) from one end,
# each row fetched from the heap to be tested: 3.1 s at a million rows for a term that
# matches nothing, against 0.7 s for two plain scans (the total, then the page, sorted).
SHORT_TERM_PLAN = "SET LOCAL enable_indexscan = off"


def short_term(query: ListQuery) -> bool:
    """Whether `q` is too short for the trigram index (a scan, whatever the plan)."""
    return query.q is not None and len(query.q.casefold()) < TRIGRAM


def list_filters(query: ListQuery, arg: Callable[[Any], str]) -> list[str]:
    """The WHERE clauses of the /messages filters; `arg` binds a value, returning `$n`."""
    clauses: list[str] = []
    if query.sender is not None:
        clauses.append(f"from_msisdn = {arg(query.sender)}")
    if query.recipient is not None:
        clauses.append(f"to_msisdn = {arg(query.recipient)}")
    if query.since_key is not None:
        clauses.append(f"ts_key >= {arg(query.since_key)}")
    if query.until_key is not None:
        clauses.append(f"ts_key < {arg(query.until_key)}")
    if query.q:
        # The folded column is compared with the folded term, so LIKE's case-sensitivity
        # is what we want; the trigram index serves it when pg_trgm is installed.
        folded = query.q.casefold()
        if short_term(query):
            # A term shorter than a trigram gives the index nothing to look up: with LIKE
            # the planner still chose it and read every entry of it (1.2 s at a million
            # rows, beside the inserts updating it), where a plain scan takes 0.3 s.
            # strpos() cannot use the index, and takes the term literally. (See also
            # SHORT_TERM_PLAN.)
            clauses.append(f"strpos(text_folded, {arg(folded)}) > 0")
        else:
            clauses.append(f"text_folded LIKE {arg(like_pattern(folded))} ESCAPE '\\'")
    return clauses


def binder(args: list[Any]) -> Callable[[Any], str]:
    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    return arg


def list_statement(query: ListQuery) -> tuple[str, list[Any]]:
    """The page and its total in one statement; returns (sql, arguments)."""
    args: list[Any] = []
    arg = binder(args)
    clauses = list_filters(query, arg)
    total = f"(SELECT count(*) FROM messages WHERE {' AND '.join(clauses)})" if clauses else _TOTAL
    page_clauses = list(clauses)
    if query.after is not None:
        ts_key, message_id = query.after
        after = "<" if query.descending else ">"
        page_clauses.append(f"(ts_key, message_id) {after} ({arg(ts_key)}, {arg(message_id)})")
    where = f" WHERE {' AND '.join(page_clauses)}" if page_clauses else ""
    limit, offset = arg(query.limit + 1), arg(query.offset)
    desc = " DESC" if query.descending else ""
    sql = (
        f"SELECT counted.total, {', '.join('page.' + c for c in _COLUMNS.split(', '))}"
        f" FROM (SELECT {total} AS total) AS counted LEFT JOIN LATERAL ("
        f"SELECT {_COLUMNS} FROM messages{where}"
        f" ORDER BY ts_key{desc}, message_id{desc} LIMIT {limit} OFFSET {offset}"
        f") AS page ON true ORDER BY page.ts_key{desc}, page.message_id{desc}"
    )
    return sql, args
