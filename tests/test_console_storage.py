"""The console's aggregates on every backend: exact after inserts, duplicates and deletes.

Each walk compares the store's answers with the same answers computed the slow way, in
Python, from the rows themselves; on PostgreSQL at every mix of folded and pending deltas.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from app.models import Message, instant_key
from app.records import RangeError, Refusal, dense_timeline, timeline_range
from app.storage import PostgresStore, SQLiteStore
from app.storage.migrations import migrations, split_statements
from app.storage.sqlite.connection import init_sqlite
from app.storage.sqlite.console import CONVERSATIONS as CONVERSATIONS_SQL
from tests.support.postgres import PostgresCluster, database_name

AnyStore = SQLiteStore | PostgresStore

pytestmark = pytest.mark.anyio

NO_FOLDING = 3600.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Backend:
    store: AnyStore
    delete: Callable[[Sequence[str]], None]

    async def settle(self, rng: random.Random | None = None) -> None:
        """On PostgreSQL, fold the pending deltas (now, or by chance with `rng`)."""
        if isinstance(self.store, PostgresStore) and (rng is None or rng.random() < 0.5):
            assert await self.store.fold() >= 0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    opened: AnyStore
    if request.param == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        url = cluster.clean_database()
        opened = await PostgresStore.open(url, fold_interval=NO_FOLDING)

        def delete(ids: Sequence[str]) -> None:
            cluster.execute(
                "DELETE FROM messages WHERE message_id = ANY ($1)",
                list(ids),
                database=database_name(url),
            )
    else:
        path = str(tmp_path / "console.db")
        opened = await SQLiteStore.open(path)

        def delete(ids: Sequence[str]) -> None:
            # Another connection, as an operator's retention job would be.
            with sqlite3.connect(path) as conn:
                conn.executemany("DELETE FROM messages WHERE message_id = ?", [(i,) for i in ids])

    try:
        yield Backend(opened, delete)
    finally:
        await opened.close()


def msg(message_id: str, sender: str = "+15550000000", **overrides: Any) -> Message:
    values: dict[str, Any] = {
        "message_id": message_id,
        "from": sender,
        "to": "+14155550100",
        "ts": "2025-01-15T10:00:00Z",
        "text": f"text of {message_id}",
    }
    values.update(overrides)
    return Message.model_validate(values)


async def all_rows(store: AnyStore) -> list[Message]:
    rows = await store.query("SELECT message_id, from_msisdn, to_msisdn, ts, text FROM messages")
    return [
        Message.model_construct(message_id=r[0], from_=r[1], to=r[2], ts=r[3], text=r[4])
        for r in rows
    ]


def expected_conversations(rows: list[Message]) -> list[dict[str, Any]]:
    """The conversations the slow way: group, order by last (instant, id) descending."""
    by_sender: dict[str, list[Message]] = {}
    for row in rows:
        by_sender.setdefault(row.from_, []).append(row)
    result = []
    for sender, messages in by_sender.items():
        ordered = sorted(messages, key=lambda m: (instant_key(m.ts), m.message_id))
        result.append(
            {
                "from": sender,
                "count": len(messages),
                "first_ts": ordered[0].ts,
                "last_ts": ordered[-1].ts,
                "last_message": ordered[-1].model_dump(by_alias=True),
            }
        )
    result.sort(
        key=lambda c: (instant_key(str(c["last_ts"])), c["last_message"]["message_id"]),  # type: ignore[index]
        reverse=True,
    )
    return result


async def every_conversation(store: AnyStore, limit: int) -> list[dict[str, Any]]:
    """Every page, by cursor, as the API would serve them."""
    found: list[dict[str, Any]] = []
    after = None
    while True:
        page = await store.conversations(limit, after)
        found += [c.model_dump(by_alias=True) for c in page.data]
        if page.next_cursor is None:
            return found
        last = page.data[-1]
        after = (instant_key(last.last_ts), last.last_message.message_id)


def expected_hours(rows: list[Message]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        hour = instant_key(row.ts)[:13]
        counts[hour] = counts.get(hour, 0) + 1
    return counts


async def check_everything(store: AnyStore, limit: int = 3) -> None:
    rows = await all_rows(store)
    assert await every_conversation(store, limit) == expected_conversations(rows)
    span = timeline_range("hour", "2025-01-14T00:00:00Z", "2025-01-17T00:00:00Z", datetime.now(UTC))
    assert await store.timeline(span) == expected_hours(rows)
    days = timeline_range("day", "2025-01-14T00:00:00Z", "2025-01-17T00:00:00Z", datetime.now(UTC))
    by_day: dict[str, int] = {}
    for hour, count in expected_hours(rows).items():
        by_day[hour[:10]] = by_day.get(hour[:10], 0) + count
    assert await store.timeline(days) == by_day


async def test_conversations_and_timeline_stay_exact_through_inserts_and_deletes(
    backend: Backend,
) -> None:
    # A fixed seed: the same walk every run, with ties on ts, duplicates, deletes of last,
    # first and middle messages, and senders that lose every message.
    rng = random.Random(14)
    store = backend.store
    senders = [f"+1555000{i:04}" for i in range(9)]
    next_id = 0
    for _ in range(50):
        action = rng.random()
        if action < 0.6:
            for _ in range(rng.randint(1, 10)):
                sender = senders[min(int(rng.expovariate(0.3)), len(senders) - 1)]
                message_id = f"r{rng.randint(0, next_id)}" if rng.random() < 0.2 else f"r{next_id}"
                next_id += 1
                # Few distinct instants: ties on ts are common, message_id decides.
                day, hour, second = rng.randint(14, 16), rng.randint(0, 23), rng.randint(0, 2)
                fraction = rng.choice(["", ".5", ".50", ".000000001"])
                ts = f"2025-01-{day}T{hour:02}:00:0{second}{fraction}Z"
                await store.insert(msg(message_id, sender, ts=ts))
        elif action < 0.8:
            rows = await all_rows(store)
            if rows:
                # Often a sender's last message: the case that needs the next-latest.
                victims = [m.message_id for m in rng.sample(rows, min(len(rows), 3))]
                last = expected_conversations(rows)[0]["last_message"]["message_id"]
                backend.delete([*victims, last])
        else:
            await backend.settle()
        await check_everything(store)
        await backend.settle(rng)
        await check_everything(store)


async def test_the_next_latest_message_takes_the_last_ones_place(backend: Backend) -> None:
    store = backend.store
    await store.insert(msg("a", ts="2025-01-15T10:00:00Z"))
    await store.insert(msg("c", ts="2025-01-15T10:00:00.5Z"))
    await store.insert(msg("b", ts="2025-01-15T10:00:00.500Z"))  # same instant as c: c wins
    await store.insert(msg("z", "+15550000001", ts="2025-01-15T09:00:00Z"))
    page = await store.conversations(10, None)
    assert [(c.from_, c.count, c.last_message.message_id) for c in page.data] == [
        ("+15550000000", 3, "c"),
        ("+15550000001", 1, "z"),
    ]
    assert page.data[0].first_ts == "2025-01-15T10:00:00Z"
    assert page.data[0].last_ts == "2025-01-15T10:00:00.5Z"
    backend.delete(["c"])
    page = await store.conversations(10, None)
    assert page.data[0].last_message.message_id == "b"
    await backend.settle()
    assert (await store.conversations(10, None)).data[0].last_message.message_id == "b"
    backend.delete(["a", "b"])
    page = await store.conversations(10, None)
    assert [c.from_ for c in page.data] == ["+15550000001"]
    await backend.settle()
    assert [c.from_ for c in (await store.conversations(10, None)).data] == ["+15550000001"]


async def test_duplicates_change_no_aggregate(backend: Backend) -> None:
    store = backend.store
    assert await store.insert(msg("a", ts="2025-01-15T10:00:00Z"))
    # The same id later in time and from someone else: stored once, as first sent.
    assert not await store.insert(msg("a", "+15550000009", ts="2025-01-16T10:00:00Z"))
    await check_everything(store)
    await backend.settle()
    page = await store.conversations(10, None)
    assert [(c.from_, c.count) for c in page.data] == [("+15550000000", 1)]


async def test_rejections_keep_the_newest_and_page_by_cursor(backend: Backend) -> None:
    store = backend.store

    def refusal(index: int) -> Refusal:
        return Refusal(
            f"2025-01-15T10:00:{index:02}Z",
            "/webhook",
            "no_key_matched",
            None,
            "127.0.0.1",
            index,
            None,
            f"req{index}",
        )

    await store.record_rejections([refusal(i) for i in range(5)], keep=4)
    await store.record_rejections([refusal(i) for i in range(5, 8)], keep=4)
    page = await store.rejections(3, None)
    assert [r.body_bytes for r in page.data] == [7, 6, 5]
    assert page.next_cursor is not None
    rest = await store.rejections(3, int(page.next_cursor))
    assert [r.body_bytes for r in rest.data] == [4]
    assert rest.next_cursor is None
    assert rest.data[0].request_id == "req4"


async def test_stored_contents_reads_back_what_is_there(backend: Backend) -> None:
    store = backend.store
    await store.insert(msg("a", text=None))
    await store.insert(msg("b", ts="2025-01-15T10:00:00.10Z"))
    found = await store.stored_contents(["a", "b", "nope"])
    assert found == {
        "a": ("+15550000000", "+14155550100", "2025-01-15T10:00:00.000000000Z", None),
        "b": ("+15550000000", "+14155550100", "2025-01-15T10:00:00.100000000Z", "text of b"),
    }


def test_the_timeline_covers_whole_buckets_around_the_range() -> None:
    now = datetime(2025, 3, 1, 12, 30, tzinfo=UTC)
    span = timeline_range("hour", "2025-01-15T09:30:00Z", "2025-01-15T11:00:00.000000001Z", now)
    assert (span.start_hour, span.end_hour) == ("2025-01-15T09", "2025-01-15T12")
    exact = timeline_range("hour", "2025-01-15T09:00:00Z", "2025-01-15T11:00:00Z", now)
    assert (exact.start_hour, exact.end_hour) == ("2025-01-15T09", "2025-01-15T11")
    days = timeline_range("day", None, None, now)
    assert (days.start_hour, days.end_hour) == ("2025-01-31T00", "2025-03-02T00")
    assert len(days.starts()) == 30
    body = dense_timeline(days, {"2025-02-01": 4})
    assert b'{"start":"2025-02-01T00:00:00Z","count":4}' in body
    assert b'"total":4' in body


@pytest.mark.parametrize(
    ("since", "until", "param"),
    [
        ("2025-01-15T10:00:00Z", "2025-01-15T10:00:00Z", "since"),
        ("2025-01-15T11:00:00Z", "2025-01-15T10:00:00Z", "since"),
        ("2020-01-01T00:00:00Z", "2025-01-15T10:00:00Z", "since"),
        (None, "0001-01-01T00:00:00Z", "until"),
    ],
)
def test_a_timeline_range_that_cannot_be_served_names_its_parameter(
    since: str | None, until: str, param: str
) -> None:
    with pytest.raises(RangeError) as caught:
        timeline_range("hour", since, until, datetime.now(UTC))
    assert caught.value.param == param


# Upgrading: a database at version 1 (the previous release) that already holds rows.


def v1_script(backend: str) -> str:
    return next(sql for version, sql in migrations(backend) if version == 1)


def seed_rows() -> list[Message]:
    rng = random.Random(3)
    return [
        msg(
            f"old{i}",
            f"+1555000000{rng.randint(0, 3)}",
            ts=f"2025-01-{rng.randint(14, 16)}T{rng.randint(0, 23):02}:00:00Z",
        )
        for i in range(40)
    ]


async def test_upgrading_a_sqlite_database_with_rows_builds_the_aggregates(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "v1.db")
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for statement in split_statements(v1_script("sqlite")):
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (1)")
    for m in seed_rows():
        conn.execute(
            "INSERT INTO messages (message_id, from_msisdn, to_msisdn, ts, text, created_at,"
            " ts_key, text_folded) VALUES (?, ?, ?, ?, ?, 'now', ?, ?)",
            (m.message_id, m.from_, m.to, m.ts, m.text, instant_key(m.ts), m.text),
        )
    conn.close()
    store = await SQLiteStore.open(path)
    try:
        await check_everything(store)
        # And the new triggers run from here on.
        await store.insert(msg("new", "+15550000009", ts="2025-01-16T23:00:00Z"))
        await check_everything(store)
    finally:
        await store.close()


@pytest.mark.postgres
async def test_upgrading_a_postgres_database_with_rows_builds_the_aggregates(
    postgres: PostgresCluster,
) -> None:
    url = postgres.create_database("upgrade")
    name = database_name(url)
    postgres.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)", database=name)
    postgres.execute(v1_script("postgres"), database=name)
    postgres.execute("INSERT INTO schema_version VALUES (1)", database=name)
    for index, m in enumerate(seed_rows()):
        postgres.execute(
            "INSERT INTO messages (message_id, from_msisdn, to_msisdn, ts, text, created_at,"
            " ts_key, text_folded) VALUES ($1, $2, $3, $4, $5, 'now', $6, $7)",
            m.message_id,
            m.from_,
            m.to,
            m.ts,
            m.text,
            instant_key(m.ts),
            m.text,
            database=name,
        )
        if index == 20:
            # Half the deltas folded by the old code, half still pending at the upgrade.
            postgres.execute("SELECT fold_message_counts()", database=name)
    store = await PostgresStore.open(url, fold_interval=NO_FOLDING)
    try:
        await check_everything(store)
        await store.insert(msg("new", "+15550000009", ts="2025-01-16T23:00:00Z"))
        await check_everything(store)
        assert await store.fold() >= 0
        await check_everything(store)
    finally:
        await store.close()


def test_a_conversations_page_is_read_from_the_recency_index(tmp_path: Path) -> None:
    # Not a GROUP BY per request: the page walks sender_counts_by_recency, with no sort.
    path = tmp_path / "plan.db"
    init_sqlite(str(path))
    with sqlite3.connect(path) as conn:
        for after in ("", "WHERE (s.last_ts_key, s.last_message_id) < (?, ?)"):
            sql = "EXPLAIN QUERY PLAN " + CONVERSATIONS_SQL.format(where=after)
            params = [1] if not after else ["x", "y", 1]
            plan = " / ".join(str(row[-1]) for row in conn.execute(sql, params))
            assert "sender_counts_by_recency" in plan, plan
            assert "TEMP B-TREE" not in plan, plan
            assert "SCAN m" not in plan, plan
