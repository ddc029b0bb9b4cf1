"""Migration 0004 on a database that already holds rows, on both backends."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from app.storage.migrations import SCHEMA_VERSION, migrations, split_statements
from tests.support.clients import MakeClient, message
from tests.support.lifecycle import ADMIN_HEADERS, assert_exact, corpus, lifecycle_settings
from tests.support.postgres import PostgresCluster

LIFECYCLE = 4
ROWS = (
    "INSERT INTO messages (message_id, from_msisdn, to_msisdn, ts, text, ts_key, text_folded,"
    " created_at) VALUES ({})"
)


def old_rows() -> list[tuple[str | None, ...]]:
    rows: list[tuple[str | None, ...]] = []
    for body in corpus(40):
        ts = body["ts"]
        fraction = ts[20:-1]
        key = f"{ts[:19]}.{fraction.ljust(9, '0')}Z"
        text = body["text"]
        folded = None if text is None else text.casefold()
        rows.append(
            (
                body["message_id"],
                body["from"],
                body["to"],
                ts,
                text,
                key,
                folded,
                "2029-06-01T00:00:00.000000Z",
            )
        )
    return rows


def sqlite_before_lifecycle(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, script in migrations("sqlite"):
            if version >= LIFECYCLE:
                break
            for statement in split_statements(script):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        conn.executemany(ROWS.format(", ".join("?" * 8)), old_rows())
    finally:
        conn.close()


async def postgres_before_lifecycle(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, script in migrations("postgres"):
            if version >= LIFECYCLE:
                break
            await conn.execute(script)
            await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
        # Positions by hand: the column's default is one per transaction (docs/feed.md).
        await conn.executemany(
            ROWS.replace(", created_at)", ", created_at, position)").format(
                ", ".join(f"${i}" for i in range(1, 10))
            ),
            [(*row, number) for number, row in enumerate(old_rows(), 1)],
        )
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_the_lifecycle_migration_keeps_the_rows_and_works_at_once(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, make_client: MakeClient
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
        sqlite_before_lifecycle(tmp_path / "old.db")
    else:
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        url = cluster.create_database("old")
        asyncio.run(postgres_before_lifecycle(url))
    client = make_client(lifecycle_settings(url))
    assert client.get("/health/ready").status_code == 200
    assert client.rows("SELECT max(version) FROM schema_version") == [(SCHEMA_VERSION,)]
    assert len(client.rows()) == 40
    assert_exact(client)
    (key,) = client.rows("SELECT key FROM lifecycle_key")[0]
    assert len(key) == 32
    assert client.delete("/messages/m00001", headers=ADMIN_HEADERS).status_code == 200
    client.post_signed(message(message_id="m00001"))
    assert client.get("/messages/m00001").status_code == 404
    assert client.get("/messages/m00002").json()["received_at"] == "2029-06-01T00:00:00.000000Z"
    assert_exact(client)
