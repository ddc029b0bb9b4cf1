"""The feed at the store and the fan-out, on both backends: positions, the horizon, the
migration of existing rows, deletions, and the hand-over from catch-up to the live tail."""

from __future__ import annotations

import asyncio
import random
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from app.feed_hub import FeedHub, Subscriber, encode_events
from app.models import FeedQuery, Message
from app.storage import PostgresStore, SQLiteStore
from app.storage.migrations import migrations, split_statements
from tests.support.postgres import PostgresCluster

AnyStore = SQLiteStore | PostgresStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "file", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AnyStore]:
    opened: AnyStore
    if request.param == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        opened = await PostgresStore.open(cluster.clean_database())
    else:
        path = ":memory:" if request.param == "memory" else str(tmp_path / "store.db")
        opened = await SQLiteStore.open(path)
    try:
        yield opened
    finally:
        await opened.close()


def msg(message_id: str, sender: str = "+919876543210") -> Message:
    return Message.model_validate(
        {
            "message_id": message_id,
            "from": sender,
            "to": "+14155550100",
            "ts": "2025-01-15T10:00:00Z",
            "text": f"text of {message_id}",
        }
    )


async def everything(
    store: AnyStore, sender: str | None = None, after: int = 0
) -> list[tuple[int, str]]:
    """(position, message_id) of every row the feed hands out after `after`, paging as a
    consumer does."""
    seen: list[tuple[int, str]] = []
    while True:
        batch = await store.read_feed(FeedQuery(after=after, limit=7, sender=sender))
        if not batch.rows:
            return seen
        seen += [(row[0], row[1]) for row in batch.rows]
        after = batch.rows[-1][0]


async def test_positions_follow_commits_and_skip_duplicates(store: AnyStore) -> None:
    for wave in range(3):
        created = await asyncio.gather(*(store.insert(msg(f"w{wave}-{i}")) for i in range(40)))
        assert all(created)
        assert not any(await asyncio.gather(*(store.insert(msg(f"w{wave}-{i}")) for i in [1, 2])))
    seen = await everything(store)
    positions = [position for position, _ in seen]
    assert positions == sorted(set(positions))
    assert sorted(message_id for _, message_id in seen) == sorted(
        f"w{wave}-{i}" for wave in range(3) for i in range(40)
    )
    # Each wave was committed before the next began: waves never interleave.
    assert [message_id.split("-")[0] for _, message_id in seen] == sorted(
        message_id.split("-")[0] for _, message_id in seen
    )


async def test_settled_covers_what_was_read(store: AnyStore) -> None:
    await store.insert(msg("a"))
    batch = await store.read_feed(FeedQuery(after=0, limit=10))
    assert [row[1] for row in batch.rows] == ["a"]
    assert batch.settled >= batch.rows[0][0]
    later = await store.read_feed(FeedQuery(after=batch.settled, limit=10))
    assert later.rows == []
    await store.insert(msg("b"))
    assert [row[1] for row in (await store.read_feed(FeedQuery(after=batch.settled))).rows] == ["b"]


async def test_following_one_sender(store: AnyStore) -> None:
    for i in range(20):
        await store.insert(msg(f"m{i}", sender="+15550000001" if i % 3 else "+15550000002"))
    theirs = await everything(store, sender="+15550000002")
    assert [message_id for _, message_id in theirs] == [f"m{i}" for i in range(0, 20, 3)]


async def test_the_signal_fires_after_a_commit(store: AnyStore) -> None:
    seen = store.feed_signal.generation
    waiting = asyncio.ensure_future(store.feed_signal.wait(seen, 5))
    await store.insert(msg("a"))
    assert await waiting
    assert (await store.read_feed(FeedQuery())).rows[0][1] == "a"


async def test_the_head_is_the_newest_readable_position(store: AnyStore) -> None:
    assert await store.feed_head() == 0
    for i in range(12):
        await store.insert(msg(f"m{i}"))
    head = await store.feed_head()
    assert head == (await everything(store))[-1][0]
    assert (await store.read_feed(FeedQuery(after=head))).rows == []
    await store.insert(msg("next"))
    assert [message_id for _, message_id in await everything(store, after=head)] == ["next"]


# Existing stores: rows stored before version 2 get positions by the migration.


def version_one_sqlite(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    (script,) = [sql for version, sql in migrations("sqlite") if version == 1]
    conn.execute("BEGIN")
    for statement in split_statements(script):
        conn.execute(statement)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (1)")
    conn.execute("COMMIT")
    return conn


LEGACY = [  # (message_id, created_at), inserted in this order: not the order received
    ("third", "2025-01-15T10:00:02.000000Z"),
    ("first", "2025-01-15T10:00:00.000000Z"),
    ("second-b", "2025-01-15T10:00:01.000000Z"),
    ("second-a", "2025-01-15T10:00:01.000000Z"),
]


async def test_the_migration_numbers_existing_sqlite_rows_in_arrival_order(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    conn = version_one_sqlite(path)
    for message_id, created_at in LEGACY:
        conn.execute(
            "INSERT INTO messages (message_id, from_msisdn, to_msisdn, ts, ts_key, created_at)"
            " VALUES (?, '+15550000001', '+15550000002', 't', 'k', ?)",
            (message_id, created_at),
        )
    conn.close()
    store = await SQLiteStore.open(str(path))
    try:
        await store.insert(msg("new"))
        seen = await everything(store)
    finally:
        await store.close()
    # Within one created_at (one group commit), the order of the insert.
    assert seen == [(1, "first"), (2, "second-b"), (3, "second-a"), (4, "third"), (5, "new")]


async def test_the_migration_numbers_existing_postgres_rows_in_arrival_order(
    postgres: PostgresCluster,
) -> None:
    url = postgres.create_database("legacy")
    conn = await asyncpg.connect(url)
    try:
        (script,) = [sql for version, sql in migrations("postgres") if version == 1]
        await conn.execute(script)
        await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        await conn.execute("INSERT INTO schema_version VALUES (1)")
        for message_id, created_at in LEGACY:
            await conn.execute(
                "INSERT INTO messages (message_id, from_msisdn, to_msisdn, ts, ts_key,"
                " created_at) VALUES ($1, '+15550000001', '+15550000002', 't', 'k', $2)",
                message_id,
                created_at,
            )
    finally:
        await conn.close()
    store = await PostgresStore.open(url)
    try:
        await store.insert(msg("new"))
        seen = await everything(store)
    finally:
        await store.close()
    # Within one created_at, message_id: PostgreSQL kept no other order.
    assert seen[:4] == [(1, "first"), (2, "second-a"), (3, "second-b"), (4, "third")]
    assert seen[4][1] == "new"
    assert seen[4][0] > 1 << 16


# Deletions (retention, erasure): a position is never handed out twice.


async def reopen_after_deleting_the_newest(path: Path) -> tuple[int, int]:
    """(the deleted newest position, the position of a row inserted after a restart)."""
    store = await SQLiteStore.open(str(path))
    try:
        for i in range(3):
            await store.insert(msg(f"m{i}"))
        newest = (await everything(store))[-1][0]
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM messages WHERE position = ?", (newest,))
    store = await SQLiteStore.open(str(path))
    try:
        await store.insert(msg("after-restart"))
        return newest, (await everything(store))[-1][0]
    finally:
        await store.close()


async def test_a_deleted_newest_position_is_not_reused_after_a_restart(tmp_path: Path) -> None:
    deleted, new = await reopen_after_deleting_the_newest(tmp_path / "app.db")
    assert new > deleted


async def test_without_the_high_water_mark_the_position_would_be_reused(tmp_path: Path) -> None:
    # The broken variant: max(position) + 1 alone, as the rowid would do.
    path = tmp_path / "app.db"
    await (await SQLiteStore.open(str(path))).close()  # the schema, then the damage
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TRIGGER messages_feed_after_delete")
    deleted, new = await reopen_after_deleting_the_newest(path)
    assert new == deleted  # what test_a_deleted_newest_position_... catches


async def test_a_deleted_newest_postgres_position_is_not_reused(
    postgres: PostgresCluster,
) -> None:
    url = postgres.clean_database()
    store = await PostgresStore.open(url)
    try:
        for i in range(3):
            await store.insert(msg(f"m{i}"))
        newest = (await everything(store))[-1][0]
        postgres.execute(
            "DELETE FROM messages WHERE position = $1", newest, database=url.rsplit("/", 1)[1]
        )
        await store.insert(msg("after"))
        assert (await everything(store))[-1][0] > newest
    finally:
        await store.close()


async def test_a_row_inserted_by_hand_gets_a_position_in_order(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    store = await SQLiteStore.open(str(path))
    try:
        await store.insert(msg("service-1"))
        with sqlite3.connect(path) as conn:
            conn.execute(
                "INSERT INTO messages (message_id, from_msisdn, to_msisdn, ts, ts_key, created_at)"
                " VALUES ('by-hand', '+15550000001', '+15550000002', 't', 'k', 'c')"
            )
        # The writer's next number is taken now: it starts past it and retries.
        assert await store.insert(msg("service-2")) is True
        seen = await everything(store)
    finally:
        await store.close()
    assert [message_id for _, message_id in seen] == ["service-1", "by-hand", "service-2"]


# PostgreSQL: commits out of order never let a consumer skip a row.


async def test_a_row_waits_below_an_older_transaction_still_in_flight(
    postgres: PostgresCluster,
) -> None:
    url = postgres.clean_database()
    store = await PostgresStore.open(url)
    slow = await asyncpg.connect(url)
    try:
        await slow.execute("BEGIN")
        await slow.execute(
            "INSERT INTO messages (message_id, from_msisdn, to_msisdn, ts, ts_key, created_at)"
            " VALUES ('older', '+15550000001', '+15550000002', 't', 'k', 'c')"
        )
        await store.insert(msg("newer"))  # committed, with a higher xid
        held = await store.read_feed(FeedQuery())
        assert held.rows == []
        assert held.pending
        # What "position > last" would hand out now, and so skip "older" for good:
        naive = await store.query("SELECT message_id FROM messages ORDER BY position")
        assert naive == [("newer",)]
        await slow.execute("COMMIT")
        assert [message_id for _, message_id in await everything(store)] == ["older", "newer"]
    finally:
        await slow.close()
        await store.close()


class HeadWithoutHorizon(PostgresStore):
    """Broken: the newest committed position as the head, ignoring the horizon."""

    async def feed_head(self) -> int:
        ((newest,),) = await self.query("SELECT coalesce(max(position), 0) FROM messages")
        return int(newest)


@pytest.mark.parametrize("store_class", [PostgresStore, HeadWithoutHorizon])
async def test_following_from_the_head_misses_no_row_of_an_older_transaction(
    postgres: PostgresCluster, store_class: type[PostgresStore]
) -> None:
    url = postgres.clean_database()
    store = await store_class.open(url)
    slow = await asyncpg.connect(url)
    try:
        await store.insert(msg("before"))
        await slow.execute("BEGIN")
        await slow.execute(
            "INSERT INTO messages (message_id, from_msisdn, to_msisdn, ts, ts_key, created_at)"
            " VALUES ('older', '+15550000001', '+15550000002', 't', 'k', 'c')"
        )
        await store.insert(msg("newer"))  # committed, with a higher xid than "older"
        head = await store.feed_head()
        await slow.execute("COMMIT")
        followed = [message_id for _, message_id in await everything(store, after=head)]
    finally:
        await slow.close()
        await store.close()
    # From the head: everything not read before it, each once. Without the horizon, the
    # head passes "older", which commits later below it and is never handed out.
    assert (followed == ["older", "newer"]) is (store_class is PostgresStore)


# The fan-out: one tail reader, subscribers catching up and joining it.

_ID = re.compile(rb"^id: (\d+)\nevent: message\ndata: .*?\"message_id\":\"([^\"]+)\"", re.M)


async def collect(
    hub: FeedHub, subscriber: Subscriber, wanted: int, into: list[tuple[int, str]]
) -> None:
    stream = hub.stream(subscriber)
    try:
        async for chunk in stream:
            into += [(int(p), m.decode()) for p, m in _ID.findall(chunk)]
            if len(into) >= wanted:
                return
    finally:
        await stream.aclose()


class JoinAtOnce(FeedHub):
    """Broken: lets a subscriber join the tail without catching up to its floor."""

    def _floor(self) -> int:
        return 0


@pytest.mark.parametrize("hub_class", [FeedHub, JoinAtOnce])
async def test_subscribers_joining_at_any_moment_see_each_message_once(
    store: AnyStore, hub_class: type[FeedHub]
) -> None:
    # A small ring and small pages, so that subscribers really catch up before joining.
    hub = hub_class(store, page_size=16, ring_bytes=4096)
    total = 400
    rng = random.Random(7)
    expected: list[str] = []

    async def write() -> None:
        for i in range(total):
            sender = "+15550000002" if i % 5 == 0 else "+15550000001"
            expected.append(f"m{i}")
            assert await store.insert(msg(f"m{i}", sender=sender))
            if rng.random() < 0.2:
                await asyncio.sleep(rng.uniform(0, 0.01))

    results: list[tuple[str, list[tuple[int, str]]]] = []

    async def join_later(delay: float, sender: str | None, wanted: int) -> None:
        await asyncio.sleep(delay)
        got: list[tuple[int, str]] = []
        results.append((sender or "all", got))
        await collect(hub, Subscriber(0, sender), wanted, got)

    joiners = [asyncio.ensure_future(join_later(d, None, total)) for d in (0, 0.05, 0.2, 0.4, 0.8)]
    joiners.append(asyncio.ensure_future(join_later(0.3, "+15550000002", total // 5)))
    try:
        async with asyncio.timeout(30):
            await write()
        # The broken hub leaves some waiting for rows they skipped: give them a moment.
        await asyncio.wait(joiners, timeout=3)
    finally:
        for joiner in joiners:
            joiner.cancel()
        await asyncio.gather(*joiners, return_exceptions=True)
        await hub.close()
    complete = all(
        [m for _, m in got] == (expected if sender == "all" else expected[::5])
        and [p for p, _ in got] == sorted({p for p, _ in got})
        for sender, got in results
    )
    assert complete is (hub_class is FeedHub)


async def test_a_subscriber_that_does_not_read_is_dropped(store: AnyStore) -> None:
    hub = FeedHub(store)
    dropped = asyncio.Event()
    stalled = Subscriber(0, None, limit=2000, on_drop=dropped.set)
    reading: list[tuple[int, str]] = []
    stalled_stream = hub.stream(stalled)
    try:
        assert await anext(stalled_stream)  # the preamble; it reads nothing after it
        first = asyncio.ensure_future(anext(stalled_stream))  # joins the tail
        # On the tail before the inserts: one that commits while it still catches up
        # would come to it as a catch-up page, and a stream stopped in its catch-up
        # holds nothing of the hub's, so there would be nothing to drop.
        async with asyncio.timeout(10):
            while hub.subscribers < 1:
                await asyncio.sleep(0.005)
        reader = asyncio.ensure_future(collect(hub, Subscriber(0, None), 60, reading))
        for i in range(60):
            await store.insert(msg(f"m{i}"))
        async with asyncio.timeout(10):
            await dropped.wait()
            await reader
        assert stalled.dropped
        assert hub.dropped_slow == 1
        assert hub.subscribers <= 1
        assert [m for _, m in reading] == [f"m{i}" for i in range(60)]
        first.cancel()
    finally:
        await stalled_stream.aclose()
        await hub.close()


async def test_the_hub_counts_open_streams(store: AnyStore) -> None:
    hub = FeedHub(store)
    streams = [hub.stream(Subscriber(0, None)) for _ in range(3)]
    try:
        for stream in streams:
            assert await anext(stream)  # the preamble: the stream is open
        assert hub.streams == 3
        await streams[0].aclose()
        assert hub.streams == 2
    finally:
        for stream in streams:
            await stream.aclose()
        await hub.close()
    assert hub.streams == 0
    assert hub.dropped_slow == 0


def test_each_event_is_one_data_line() -> None:
    row: tuple[Any, ...] = (1, "m\n1", "+1", "+2", "t", "line\nbreak\r\u2028", "r")
    chunk = encode_events([row])
    assert chunk.endswith(b"\n\n")
    assert chunk.count(b"\n") == 4
    assert chunk.startswith(b"id: 1\nevent: message\ndata: {")
