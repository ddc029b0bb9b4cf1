"""What only PostgreSQL needs for the lifecycle: an erasure that a redelivery in flight
cannot undo, one purging replica at a time, and hashes that agree across replicas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from app.models import Message
from app.storage import StorageUnavailable
from app.storage.lifecycle import tombstone_hash
from app.storage.postgres.lifecycle import PURGE_LOCK, erase_message
from app.storage.postgres.store import PostgresStore
from app.storage.rows import utc_now
from tests.support.broken_stores import erase_without_lock
from tests.support.lifecycle import FakeClock
from tests.support.postgres import PostgresCluster

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

NO_FOLDING = 3600.0
Eraser = Callable[[Any, bytes, str, str], Awaitable[int]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def url(postgres: PostgresCluster) -> str:
    return postgres.clean_database()


@pytest.fixture
async def store(url: str) -> AsyncIterator[PostgresStore]:
    opened = await PostgresStore.open(url, fold_interval=NO_FOLDING)
    try:
        yield opened
    finally:
        await opened.close()


def msg(message_id: str) -> Message:
    return Message.model_validate(
        {
            "message_id": message_id,
            "from": "+15550000000",
            "to": "+14155550100",
            "ts": "2025-01-15T10:00:00Z",
            "text": "Hello",
        }
    )


async def wait_for_a_lock_wait(url: str) -> None:
    """Until some session of this database waits on a lock (bounded)."""
    conn = await asyncpg.connect(url)
    try:
        for _ in range(500):
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the redelivery never waited for the erasure")
    finally:
        await conn.close()


async def race_a_redelivery_against(eraser: Eraser, url: str, store: PostgresStore) -> bool:
    """Erase m1 while its redelivery is in flight; whether m1 is stored afterwards.

    The erasure is held open, uncommitted, until the redelivery's insert is waiting on
    it: the worst moment, every time.
    """
    assert await store.insert(msg("m1"))
    conn = await asyncpg.connect(url)
    try:
        key = bytes(await conn.fetchval("SELECT key FROM lifecycle_key"))
        outer = conn.transaction()
        await outer.start()
        assert await eraser(conn, key, "m1", utc_now()) == 1
        redelivery = asyncio.create_task(store.insert(msg("m1")))
        await wait_for_a_lock_wait(url)
        await outer.commit()
        await redelivery
    finally:
        await conn.close()
    rows = await store.query("SELECT message_id FROM messages")
    return rows == [("m1",)]


async def test_a_redelivery_in_flight_cannot_undo_an_erasure(
    url: str, store: PostgresStore
) -> None:
    assert not await race_a_redelivery_against(erase_message, url, store)
    stats = await store.stats()
    assert stats.total_messages == 0
    assert await store.lifecycle.is_tombstoned("m1")


async def test_the_race_is_real_without_the_table_lock(url: str, store: PostgresStore) -> None:
    # The broken variant: the redelivery waits for the erasure, then stores the row again.
    assert await race_a_redelivery_against(erase_without_lock, url, store)


async def test_only_one_replica_purges_at_a_time_and_inserts_go_on(url: str) -> None:
    clock = FakeClock()
    replicas = [
        await PostgresStore.open(url, fold_interval=NO_FOLDING, clock=clock) for _ in range(2)
    ]
    try:
        for i in range(30):
            await replicas[i % 2].insert(msg(f"old{i}"))
        clock.advance(days=10)
        conn = await asyncpg.connect(url)
        try:
            async with conn.transaction():
                # Another replica is purging: this one stands aside at once, and ingest
                # is not held up by either.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", PURGE_LOCK)
                purged = await asyncio.wait_for(
                    replicas[0].lifecycle.purge(timedelta(days=1), timedelta(days=30), 100), 2
                )
                assert purged == 0
                assert await asyncio.wait_for(replicas[1].insert(msg("new")), 2)
        finally:
            await conn.close()
        counts = await asyncio.gather(
            *(r.lifecycle.purge(timedelta(days=1), timedelta(days=30), 100) for r in replicas)
        )
        assert sorted(counts) == [0, 30]
        assert await replicas[0].query("SELECT message_id FROM messages") == [("new",)]
    finally:
        for replica in replicas:
            await replica.close()


async def test_every_replica_hashes_with_the_one_key_in_the_database(url: str) -> None:
    replicas = [await PostgresStore.open(url, fold_interval=NO_FOLDING) for _ in range(2)]
    try:
        await replicas[0].insert(msg("m1"))
        erasure = await replicas[0].lifecycle.erase_message("m1")
        assert erasure.deleted == 1
        assert not await replicas[1].insert(msg("m1"))
        assert await replicas[1].lifecycle.is_tombstoned("m1")
        key = (await replicas[1].query("SELECT key FROM lifecycle_key"))[0][0]
        assert len(key) == 32
        assert erasure.target == tombstone_hash(bytes(key), "m1").hex()
    finally:
        for replica in replicas:
            await replica.close()


async def test_an_erasure_that_cannot_lock_out_inserts_gives_up_in_bounded_time(
    url: str, store: PostgresStore
) -> None:
    assert await store.insert(msg("m1"))
    conn = await asyncpg.connect(url)
    try:
        stuck = conn.transaction()
        await stuck.start()
        # What a stuck insert holds: a share lock on tombstones, until it ends.
        await conn.execute("SELECT 1 FROM tombstones LIMIT 1")
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(StorageUnavailable):
            await store.lifecycle.erase_message("m1")
        assert loop.time() - started < 4
        await stuck.rollback()
    finally:
        await conn.close()
    assert (await store.lifecycle.erase_message("m1")).deleted == 1
