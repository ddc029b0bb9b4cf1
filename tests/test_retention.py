"""Retention on a clock the tests move: what it deletes, that every aggregate stays exact,
the tombstones it leaves and their expiry, on both backends."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from app import retention
from app.config import Settings
from app.metrics import Metrics
from app.retention import Retention
from app.storage import SQLiteStore
from tests.support.clients import AppClient, message
from tests.support.lifecycle import (
    ADMIN_HEADERS,
    FakeClock,
    assert_exact,
    clocked_client,
    corpus,
    lifecycle_settings,
    post_all,
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def open_client(settings: Settings, clock: FakeClock) -> Iterator[AppClient]:
    client = clocked_client(settings, clock)
    with client:
        yield client


@pytest.fixture
def settings(database_url: str) -> Settings:
    return lifecycle_settings(database_url, retention_days=2, tombstone_days=5)


@pytest.fixture
def client(settings: Settings, clock: FakeClock) -> Iterator[AppClient]:
    yield from open_client(settings, clock)


def run_retention(client: AppClient, settings: Settings) -> tuple[int, int]:
    task = Retention(client.store, settings, client.app_state["metrics"])
    assert client.portal is not None
    return client.portal.call(task.run_once)


def index_search(client: AppClient) -> None:
    # SQLite indexes in the background; the purge must also be right for indexed rows.
    if isinstance(client.store, SQLiteStore):
        assert client.portal is not None
        client.portal.call(client.store.index_search)


def without_received(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "received_at"}


def test_retention_purges_by_received_at_and_keeps_every_aggregate_exact(
    client: AppClient, settings: Settings, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "PURGE_BATCH", 7)  # many batches, a partial last one
    first, second, third = corpus(40, 1, "a"), corpus(40, 2, "b"), corpus(40, 3, "c")
    post_all(client, first)
    clock.advance(days=1)
    post_all(client, second)
    clock.advance(days=1)
    post_all(client, third)
    post_all(client, first[:5])  # duplicates change nothing
    index_search(client)
    assert_exact(client)
    originals = {body["message_id"]: body for body in first}

    clock.advance(hours=12)  # first is 2.5 days old: past RETENTION_DAYS=2
    assert run_retention(client, settings) == (40, 0)
    assert {row[0][0] for row in client.rows()} == {"b", "c"}
    assert client.metric("webhook_messages_purged_total") == 40
    assert_exact(client)
    tombstones = client.rows("SELECT expires_at FROM tombstones")
    assert tombstones == [("2030-01-08T12:00:00.000000Z",)] * 40
    assert run_retention(client, settings) == (0, 0)

    # A sender redelivering a purged message within TOMBSTONE_DAYS stores nothing.
    assert client.post_signed(originals["a00003"]).status_code == 200
    assert client.get("/messages/a00003").status_code == 404

    clock.advance(days=1)
    assert run_retention(client, settings) == (40, 0)
    assert {row[0][0] for row in client.rows()} == {"c"}
    assert_exact(client)

    # Past the first tombstones' expiry: they go, and a redelivery is stored again.
    clock.advance(days=4, seconds=1)
    assert run_retention(client, settings) == (40, 40)
    assert client.metric("webhook_tombstones_expired_total") == 40
    assert len(client.rows("SELECT hash FROM tombstones")) == 80
    assert client.rows() == []
    assert client.post_signed(originals["a00003"]).status_code == 200
    again = client.get("/messages/a00003").json()
    assert without_received(again) == originals["a00003"]
    assert again["received_at"] == "2030-01-08T12:00:01.000000Z"
    assert_exact(client)


def test_without_tombstone_days_a_purged_message_can_come_back(
    database_url: str, clock: FakeClock
) -> None:
    settings = lifecycle_settings(database_url, retention_days=1, tombstone_days=0)
    for client in open_client(settings, clock):
        post_all(client, corpus(10))
        clock.advance(days=2)
        assert run_retention(client, settings) == (10, 0)
        assert client.rows("SELECT hash FROM tombstones") == []
        client.post_signed(corpus(10)[0])
        assert len(client.rows()) == 1


def test_erasure_tombstones_never_expire(
    client: AppClient, settings: Settings, clock: FakeClock
) -> None:
    client.post_signed(message(message_id="keep-erased"))
    assert client.delete("/messages/keep-erased", headers=ADMIN_HEADERS).status_code == 200
    clock.advance(days=3650)
    run_retention(client, settings)
    assert len(client.rows("SELECT hash FROM tombstones WHERE expires_at IS NULL")) == 1
    client.post_signed(message(message_id="keep-erased"))
    assert client.rows() == []


def test_search_stays_exact_when_the_newest_rows_are_deleted_and_their_rowids_reused(
    client: AppClient,
) -> None:
    # SQLite gives a new row max(rowid) + 1: erase the newest rows once indexed, and new
    # rows take their rowids. Those must be searchable (indexed, not taken as indexed).
    messages = corpus(60)
    post_all(client, messages)
    index_search(client)
    for body in messages[-5:]:
        assert client.delete(f"/messages/{body['message_id']}", headers=ADMIN_HEADERS).json() == {
            "deleted": 1,
            "tombstones": 1,
        }
    assert_exact(client)
    post_all(client, [message(message_id=f"new{i}", text=f"hello again {i}") for i in range(8)])
    assert_exact(client)
    index_search(client)
    assert_exact(client)


def test_retention_runs_in_the_background(database_url: str, clock: FakeClock) -> None:
    settings = lifecycle_settings(database_url, retention_days=1, retention_interval_seconds=0.05)
    for client in open_client(settings, clock):
        post_all(client, corpus(30))
        clock.advance(days=1, seconds=1)
        deadline = time.monotonic() + 10
        while client.rows() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.rows() == []
        assert client.metric("webhook_messages_purged_total") == 30
        assert_exact(client)


def test_without_retention_days_nothing_is_purged(database_url: str, clock: FakeClock) -> None:
    settings = lifecycle_settings(database_url)
    for client in open_client(settings, clock):
        post_all(client, corpus(10))
        clock.advance(days=36500)
        assert run_retention(client, settings) == (0, 0)
        assert len(client.rows()) == 10


def fts_check(client: AppClient) -> None:
    """The search index holds exactly the indexed rows: FTS5's own check of its
    structure, then no entry for a row that is gone and none missing for a row indexed."""
    assert client.portal is not None

    def check(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")

    client.portal.call(client.sqlite_store._write_call, check)
    stale = client.rows(
        "SELECT count(*) FROM messages_fts_docsize WHERE id NOT IN (SELECT rowid FROM messages)"
    )
    missing = client.rows(
        "SELECT count(*) FROM messages WHERE text_folded IS NOT NULL"
        " AND rowid <= (SELECT indexed_through FROM search_progress)"
        " AND rowid NOT IN (SELECT id FROM messages_fts_docsize)"
    )
    assert (stale, missing) == ([(0,)], [(0,)])


def indexed_rowids(client: AppClient, phrase: str) -> set[int]:
    rows = client.rows(f"SELECT rowid FROM messages_fts WHERE messages_fts MATCH '\"{phrase}\"'")
    return {row[0] for row in rows}


def test_a_purge_leaves_its_search_entries_to_the_indexer(clock: FakeClock) -> None:
    settings = lifecycle_settings("sqlite:///:memory:", retention_days=1)
    for client in open_client(settings, clock):
        client.sqlite_store._writer.search.automatic = False  # hold each state
        post_all(client, corpus(80, 1, "a"))
        clock.advance(days=2)
        post_all(client, corpus(40, 2, "b"))
        index_search(client)
        fts_check(client)
        assert run_retention(client, settings) == (80, 0)
        # The entries wait; searches are exact meanwhile, and the index is stale.
        assert client.rows("SELECT count(*) FROM search_garbage")[0][0] > 0
        assert_exact(client)
        with pytest.raises(AssertionError):
            fts_check(client)
        index_search(client)
        assert client.rows("SELECT count(*) FROM search_garbage") == [(0,)]
        fts_check(client)
        assert_exact(client)


def purge_statements(clock: FakeClock, rows: int) -> int:
    """The SQL statements one purge batch of `rows` rows runs on the writer's connection."""
    settings = lifecycle_settings("sqlite:///:memory:", retention_days=1)
    for client in open_client(settings, clock):
        writer = client.sqlite_store._writer
        writer.search.automatic = False  # no indexing statements in between
        post_all(client, corpus(rows, 3, f"s{rows}-"))
        index_search(client)
        clock.advance(days=2)
        statements: list[str] = []
        writer.conn.set_trace_callback(statements.append)
        try:
            assert client.portal is not None
            purged = client.portal.call(
                client.store.lifecycle.purge, timedelta(days=1), timedelta(days=5), 1000
            )
        finally:
            writer.conn.set_trace_callback(None)
        assert purged == rows
        assert_exact(client)
    # A statement's trigger programs are traced as more lines of its own text, and FTS5's
    # inner statements as "-- ..." lines: neither is a call from Python.
    calls = [sql for sql in statements if not sql.startswith("--")]
    return sum(1 for _ in itertools.groupby(calls))


def test_a_purge_batch_runs_as_many_statements_whatever_its_size(clock: FakeClock) -> None:
    # Each SQLite call from the writer gives the GIL to the event loop and, under load,
    # waits up to 5 ms to get it back with the write lock held: a statement per row
    # (an executemany) made batches of 150 rows hold inserts back for 100 ms and more.
    assert purge_statements(clock, 10) == purge_statements(clock, 300)


def test_the_idle_writer_deletes_purged_entries_by_itself(clock: FakeClock) -> None:
    settings = lifecycle_settings("sqlite:///:memory:", retention_days=1)
    for client in open_client(settings, clock):
        post_all(client, corpus(60))
        index_search(client)
        clock.advance(days=2)
        assert run_retention(client, settings) == (60, 0)
        deadline = time.monotonic() + 10
        while client.rows("SELECT count(*) FROM search_garbage") != [(0,)]:
            assert time.monotonic() < deadline, "the indexer never caught up"
            time.sleep(0.05)
        fts_check(client)


def test_an_erasure_takes_the_text_out_of_the_index_at_once(clock: FakeClock) -> None:
    settings = lifecycle_settings("sqlite:///:memory:")
    for client in open_client(settings, clock):
        client.sqlite_store._writer.search.automatic = False
        post_all(client, [message(message_id="secret", text="my password is hunter2")])
        post_all(client, corpus(20))
        index_search(client)
        (rowid,) = client.rows("SELECT rowid FROM messages WHERE message_id = 'secret'")[0]
        assert rowid in indexed_rowids(client, "hunter2")
        assert client.delete("/messages/secret", headers=ADMIN_HEADERS).status_code == 200
        assert indexed_rowids(client, "hunter2") == set()
        assert client.rows("SELECT count(*) FROM search_garbage") == [(0,)]
        fts_check(client)


def test_waiting_entries_never_meet_a_reused_rowid(clock: FakeClock) -> None:
    # A purge leaves entries waiting; then every row left is erased, so SQLite hands the
    # same rowids out again. The waiting entries must go before those rowids are indexed
    # again, or deleting them later would take the new rows' entries with them.
    settings = lifecycle_settings("sqlite:///:memory:", retention_days=1)
    for client in open_client(settings, clock):
        client.sqlite_store._writer.search.automatic = False
        old = corpus(30, 1, "a")
        post_all(client, old)
        clock.advance(days=2)
        post_all(client, corpus(10, 2, "b"))
        index_search(client)
        assert run_retention(client, settings) == (30, 0)
        for (message_id,) in client.rows():
            assert (
                client.delete(f"/messages/{message_id}", headers=ADMIN_HEADERS).status_code == 200
            )
        assert client.rows("SELECT count(*) FROM search_garbage") == [(0,)]
        post_all(client, [{**body, "message_id": "re-" + body["message_id"]} for body in old])
        assert client.rows("SELECT min(rowid) FROM messages") == [(1,)]
        index_search(client)
        fts_check(client)
        assert_exact(client)


class TimedPurges:
    """A lifecycle whose every purged row costs `row_seconds` on a timer the test owns,
    with `rows` due: what the batch sizing sees, without a database's noise."""

    def __init__(self, rows: int, row_seconds: float) -> None:
        self.rows = rows
        self.row_seconds = row_seconds
        self.now = 0.0
        self.sizes: list[int] = []

    async def purge(self, older_than: Any, tombstone_for: Any, limit: int) -> int:
        self.sizes.append(limit)
        count = min(limit, self.rows)
        self.rows -= count
        self.now += count * self.row_seconds
        return count

    async def expire_tombstones(self, limit: int) -> int:
        return 0


@pytest.mark.parametrize(
    ("row_ms", "settled"),
    [(0.3, 50), (0.15, 100), (0.01, retention.PURGE_BATCH_MAX), (10.0, retention.PURGE_BATCH_MIN)],
)
def test_purge_batches_are_sized_to_take_about_the_target(
    row_ms: float, settled: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention, "BATCH_PAUSE_SECONDS", 0)
    purges = TimedPurges(rows=100_000, row_seconds=row_ms / 1000)
    store = type("Store", (), {"lifecycle": purges})()
    settings = lifecycle_settings("sqlite:///:memory:", retention_days=2, tombstone_days=5)
    task = Retention(store, settings, Metrics(), timer=lambda: purges.now)
    purged, _ = asyncio.run(task.run_once())
    assert purged == 100_000
    sizes = purges.sizes
    assert sizes[0] == retention.PURGE_BATCH
    # Never more than double the batch before, and settled at about the target.
    assert all(after <= 2 * before for before, after in itertools.pairwise(sizes))
    assert abs(sizes[-2] - settled) <= 1
    assert task.batch == sizes[-1]
