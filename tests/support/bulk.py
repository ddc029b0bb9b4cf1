"""Stores with enough rows that a scan takes a while: for the read deadline tests.

Rows are made by the database itself (a recursive CTE, generate_series), with long texts:
a `q` that cannot use the search index then reads every byte of every one of them.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.support.postgres import PostgresCluster, database_name

# 20,000 rows of 4,000 characters: 80 MB of text, a scan of a second or so.
ROWS = 20_000
TEXT_CHARS = 4_000

_SQLITE_FILL = """
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
INSERT INTO messages (message_id, from_msisdn, to_msisdn, ts, text, ts_key, text_folded,
                      created_at)
SELECT 'bulk' || i, '+1555' || (1000000 + i % 100), '+14155550100', '2025-01-01T00:00:00Z',
       printf('%.*c', ?, 'a'), printf('2025-01-01T00:00:00.%09dZ', i), printf('%.*c', ?, 'a'),
       '2025-01-01T00:00:00Z'
  FROM n
"""
# Positions 1..N, as schema 2 numbers the rows it finds: below every transaction's own.
_POSTGRES_FILL = """
INSERT INTO messages (message_id, from_msisdn, to_msisdn, ts, text, ts_key, text_folded,
                      created_at, position)
SELECT 'bulk' || i, '+1555' || (1000000 + i % 100), '+14155550100', '2025-01-01T00:00:00Z',
       repeat(md5(i::text), $2 / 32), '2025-01-01T00:00:00.' || lpad(i::text, 9, '0') || 'Z',
       repeat(md5(i::text), $2 / 32), '2025-01-01T00:00:00Z', i
  FROM generate_series(1, $1) AS i
"""


def fill_sqlite(path: Path, rows: int = ROWS, text_chars: int = TEXT_CHARS) -> None:
    """Add `rows` long messages to the (already created) SQLite database at `path`."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        fill_sqlite_connection(conn, rows, text_chars)
    finally:
        conn.close()


def fill_sqlite_connection(
    conn: sqlite3.Connection, rows: int = ROWS, text_chars: int = TEXT_CHARS
) -> None:
    conn.execute(_SQLITE_FILL, (rows, text_chars, text_chars))


def fill_postgres(
    cluster: PostgresCluster, url: str, rows: int = ROWS, text_chars: int = TEXT_CHARS
) -> None:
    """The same on PostgreSQL (a database of its own: the trigram index is dropped, as
    indexing long texts would take minutes, and a short `q` cannot use it anyway).

    md5 digests rather than one letter, which would compress to nothing on disk.
    """
    name = database_name(url)
    cluster.execute("DROP INDEX IF EXISTS messages_text_trgm", database=name)
    cluster.execute(_POSTGRES_FILL, rows, text_chars, database=name)
    cluster.execute("ANALYZE messages", database=name)
