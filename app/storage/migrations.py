"""The versioned schema of every backend, from one place.

Each backend has a folder `app/storage/schema/<backend>/` of `NNNN_name.sql` files. Version N is
the same change on every backend (a test holds the folders to that), and SCHEMA_VERSION
is the newest. A database records what it has in its `schema_version` table. Applying
is idempotent, runs every missing version and its record in one transaction, and is
safe when several processes start at once. The service applies it at start-up;
`python -m app init-db` runs it on its own. Readiness requires the exact version.
"""

from __future__ import annotations

import sqlite3
from importlib import resources

import asyncpg

SCHEMA_VERSION = 3
BACKENDS = ("sqlite", "postgres")
# Any constant will do, as long as nothing else in the database takes this advisory lock.
POSTGRES_MIGRATION_LOCK = 0x5765_6268_6F6F_6B31  # "Webhook1"


def migrations(backend: str) -> list[tuple[int, str]]:
    """(version, sql) for every migration file shipped for a backend, in order."""
    folder = resources.files("app.storage") / "schema" / backend
    found = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


def split_statements(script: str) -> list[str]:
    # executescript() would COMMIT first; statement by statement keeps one transaction.
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in buffer.splitlines()
    ):
        raise ValueError("schema script ends with an incomplete statement")
    return statements


def apply_sqlite_schema(conn: sqlite3.Connection) -> int:
    """Bring a SQLite database to SCHEMA_VERSION, idempotently; returns the version before."""
    # IMMEDIATE: the write lock first, so two processes starting at once take turns.
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        before = int(row[0] or 0)
        for version, script in migrations("sqlite"):
            if version <= before:
                continue
            for statement in split_statements(script):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return before


async def apply_postgres_schema(conn: asyncpg.Connection) -> int:
    """Bring a PostgreSQL database to SCHEMA_VERSION, idempotently; returns the version before."""
    async with conn.transaction():
        # Replicas starting together: one applies, the others wait here, then find it done.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", POSTGRES_MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        before = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
        for version, script in migrations("postgres"):
            if version <= before:
                continue
            await conn.execute(script)  # no arguments: several statements in one go
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
    return before
