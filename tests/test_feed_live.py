"""The feed against real servers: exactly once under concurrent writers (one SQLite
instance; two replicas on one PostgreSQL), streams that resume and cross replicas, and a
stalled stream dropped with memory flat. Each guarantee beside a build that breaks it."""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.support.feed import (
    EventStream,
    Poller,
    drain_until_closed,
    last_position,
    stalled_stream,
    write_concurrently,
)
from tests.support.postgres import PostgresCluster, database_name
from tests.support.servers import Server, running_server

pytestmark = pytest.mark.slow

UVICORN = [sys.executable, "-m", "uvicorn", "--factory"]
SERVE = [sys.executable, "-m", "app", "serve"]


@contextmanager
def replicas(
    tmp_path: Path, url: str, count: int, factory: str = "app.main:create_app"
) -> Iterator[list[Server]]:
    with ExitStack() as stack:
        started = []
        for index in range(count):
            folder = tmp_path / f"replica{index}"
            folder.mkdir()
            server = running_server(
                folder,
                env={"DATABASE_URL": url, "DATABASE_POOL_SIZE": "4"},
                command=[*UVICORN, factory],
            )
            started.append(stack.enter_context(server))
        yield started


def consume_while_writing(servers: list[Server], total: int) -> tuple[list[str], Poller]:
    poller = Poller([server.base_url for server in servers])
    poller.start()
    try:
        ids = write_concurrently([server.base_url for server in servers], total)
    finally:
        poller.writers_done.set()
        poller.join(timeout=60)
    assert poller.error is None, poller.error
    return ids, poller


def exactly_once(seen: list[tuple[int, str]], table: list[tuple[int, str]]) -> bool:
    positions = [position for position, _ in seen]
    return seen == table and positions == sorted(set(positions))


def test_a_tight_poller_sees_every_message_once_on_sqlite(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        ids, poller = consume_while_writing([server], 5000)
        assert server.db_path is not None
        with sqlite3.connect(server.db_path) as conn:
            table = conn.execute("SELECT position, message_id FROM messages ORDER BY 1").fetchall()
    assert sorted(message_id for _, message_id in table) == sorted(ids)
    assert exactly_once(poller.seen, table)


def postgres_table(postgres: PostgresCluster, url: str) -> list[tuple[int, str]]:
    rows = postgres.fetch(
        "SELECT position, message_id FROM messages ORDER BY 1", database=database_name(url)
    )
    return [(int(position), str(message_id)) for position, message_id in rows]


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("factory", "total", "holds"),
    [
        ("tests.support.broken_stores:slow_commits_app", 5000, True),
        # The broken build: "position > last", as a sequence id would be read.
        ("tests.support.broken_stores:feed_without_horizon_app", 2000, False),
    ],
)
def test_a_tight_poller_sees_every_message_once_across_two_postgres_replicas(
    tmp_path: Path, postgres: PostgresCluster, factory: str, total: int, holds: bool
) -> None:
    url = postgres.create_database("feed")
    # Every insert's transaction stays open a random 0-30 ms after its INSERT, so commits
    # finish far out of position order, on both replicas at once.
    with replicas(tmp_path, url, 2, factory) as servers:
        ids, poller = consume_while_writing(servers, total)
    table = postgres_table(postgres, url)
    assert sorted(message_id for _, message_id in table) == sorted(ids)
    assert exactly_once(poller.seen, table) is holds


def test_a_stream_resumes_after_last_event_id_without_gap_or_repeat(tmp_path: Path) -> None:
    with running_server(tmp_path, command=SERVE) as server:
        write_concurrently([server.base_url], 5, writers=1, prefix="a")
        first = EventStream(server.base_url)
        got = first.messages(3)
        assert first.retry is not None
        assert first.retry > 0
        first.close()
        write_concurrently([server.base_url], 5, writers=1, prefix="b")
        # The original URL, as EventSource reconnects: the header wins over ?after=.
        again = EventStream(server.base_url, "?after=0", {"Last-Event-ID": str(got[-1][0])})
        got += again.messages(7)
        write_concurrently([server.base_url], 2, writers=1, prefix="c")
        got += again.messages(2)
        again.close()
    assert [message_id for _, message_id in got] == [
        *(f"a{i}" for i in range(5)),
        *(f"b{i}" for i in range(5)),
        "c0",
        "c1",
    ]
    assert [position for position, _ in got] == sorted({position for position, _ in got})


@pytest.mark.postgres
def test_a_stream_on_one_replica_sees_messages_posted_to_the_other(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    url = postgres.create_database("cross")
    with replicas(tmp_path, url, 2) as (a, b):
        stream = EventStream(a.base_url)
        started = time.monotonic()
        write_concurrently([b.base_url], 3, writers=1, prefix="via-b-", max_pause=0)
        got = stream.messages(3)
        write_concurrently([a.base_url], 1, writers=1, prefix="via-a-", max_pause=0)
        got += stream.messages(1)
        stream.close()
    assert [message_id for _, message_id in got] == ["via-b-0", "via-b-1", "via-b-2", "via-a-0"]
    assert time.monotonic() - started < 5  # woken by NOTIFY, not the 1 s poll each time


def rss_mb(server: Server) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


@pytest.mark.parametrize(
    ("factory", "bounded"),
    [("app.main:create_app", True), ("tests.support.feed:unbounded_feed_app", False)],
)
def test_stalled_streams_are_dropped_and_memory_stays_flat(
    tmp_path: Path, factory: str, bounded: bool
) -> None:
    text = "x" * 4000  # about 4 KB an event: 6,000 of them are 24 MB
    with running_server(tmp_path, command=[*UVICORN, factory]) as server:
        write_concurrently([server.base_url], 2000, prefix="warm", text=lambda i: text)
        rss, streams = [], []
        # Three rounds: a new client that never reads, from the tail, then 24 MB of
        # events. The first rounds also fill SQLite's page caches (32 MB for the writer)
        # and warm the allocator up; after them, a build that drops stalled clients
        # stays flat, one that keeps what they have not read grows by each round's
        # events.
        for round_ in range(3):
            streams.append(stalled_stream(server.base_url, last_position(server.base_url)))
            write_concurrently(
                [server.base_url], 6000, prefix=f"r{round_}-", text=lambda i: text, max_pause=0
            )
            time.sleep(0.5)
            rss.append(rss_mb(server))
        closed = [drain_until_closed(stream) for stream in streams]
        for stream in streams:
            stream.close()
        log = server.log_path.read_text(encoding="utf-8")
    growth = rss[2] - rss[1]
    if bounded:
        assert closed == [True, True, True]
        assert log.count("feed subscriber too slow") == 3
        assert growth < 10, rss
    else:
        assert closed == [False, False, False]
        assert growth > 18, rss  # the round's 24 MB, shared by the stalled streams


def test_a_stream_ends_cleanly_when_the_server_shuts_down(tmp_path: Path) -> None:
    with running_server(tmp_path, command=SERVE) as server:
        write_concurrently([server.base_url], 1, writers=1, prefix="a")
        stream = EventStream(server.base_url)
        assert stream.messages(1)[0][1] == "a0"
        started = time.monotonic()
        assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises it
        # The chunked body's terminator, not a connection cut mid-response.
        with pytest.raises(EOFError):
            stream.next_event()
        stream.close()
        assert time.monotonic() - started < 5
        lines = [json.loads(line) for line in server.log_lines()]
    assert not [line for line in lines if line["level"] == "ERROR"]
