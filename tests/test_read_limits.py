"""No read can hurt ingest or probes: every read has a deadline that stops it, scans run a
few at a time, and readiness checks and writes have connections of their own."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from app.models import ListQuery, Message
from app.storage import PostgresStore, QueryTooExpensive, SQLiteStore, StorageUnavailable
from app.storage.base import SCAN_OFFSET, is_scan
from app.storage.sqlite.readers import ReaderPool
from tests.support.bulk import fill_postgres, fill_sqlite, fill_sqlite_connection
from tests.support.clients import MakeClient, json_lines
from tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.anyio

AnyStore = SQLiteStore | PostgresStore
# The bulk-filled stores scan for a second or more; this deadline stops them early.
SHORT_DEADLINE = 0.05
# PostgreSQL reads the same rows several times faster than SQLite.
POSTGRES_ROWS = 100_000
BACKENDS = ["file", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def msg(message_id: str) -> Message:
    return Message.model_validate(
        {
            "message_id": message_id,
            "from": "+15550000001",
            "to": "+15550000002",
            "ts": "2025-01-15T10:00:00Z",
            "text": "hello",
        }
    )


@asynccontextmanager
async def opened(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, *, bulk: bool, **options: Any
) -> AsyncIterator[AnyStore]:
    """A store of `kind` ("file", "memory", "postgres"), bulk-filled if asked."""
    store: AnyStore
    if kind == "postgres":
        cluster: PostgresCluster = request.getfixturevalue("postgres")
        url = cluster.create_database("bulk") if bulk else cluster.clean_database()
        store = await PostgresStore.open(url, **options)
        if bulk:
            fill_postgres(cluster, url, rows=POSTGRES_ROWS)
    elif kind == "memory":
        store = await SQLiteStore.open(":memory:", **options)
        if bulk:
            await store._write_call(fill_sqlite_connection)
    else:
        store = await SQLiteStore.open(str(tmp_path / "reads.db"), **options)
        if bulk:
            fill_sqlite(tmp_path / "reads.db")
    try:
        yield store
    finally:
        await store.close()


@contextmanager
def blocked(pool: ReaderPool, threads: int) -> Iterator[None]:
    """Every thread of a SQLite reader pool busy until the block ends."""
    release = threading.Event()
    started = threading.Semaphore(0)

    def hold() -> None:
        started.release()
        release.wait(30)

    futures = [pool._executor.submit(hold) for _ in range(threads)]
    try:
        for _ in range(threads):
            assert started.acquire(timeout=10)
        yield
    finally:
        release.set()
        for future in futures:
            future.result(timeout=10)


@pytest.mark.parametrize(
    ("query", "scan"),
    [
        (ListQuery(), False),
        (ListQuery(q="abc"), False),
        (ListQuery(q="ab"), True),
        (ListQuery(q="ß"), True),  # casefolds to "ss": still under a trigram
        (ListQuery(q="ﬃ"), False),  # casefolds to "ffi"
        (ListQuery(offset=SCAN_OFFSET), False),
        (ListQuery(offset=SCAN_OFFSET + 1), True),
        (ListQuery(sender="+15550000001", q="a"), True),
    ],
)
def test_short_searches_and_deep_offsets_are_scans(query: ListQuery, scan: bool) -> None:
    assert is_scan(query) is scan


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["memory", *BACKENDS])
async def test_a_scan_is_stopped_at_its_deadline_and_the_store_goes_on(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with opened(kind, tmp_path, request, bulk=True, read_timeout=SHORT_DEADLINE) as store:
        started = time.monotonic()
        with pytest.raises(QueryTooExpensive):
            await store.list_messages(ListQuery(q="zq"))
        # The 503 comes at the deadline, not when the scan would have ended.
        assert time.monotonic() - started < 1.0
        # The stopped connection serves the next reads, and writes go on.
        for _ in range(3):
            page = await store.list_messages(ListQuery(limit=1))
            assert page.total > 0
        assert await store.insert(msg("after")) is True
        assert (await store.stats()).total_messages == page.total + 1


@pytest.mark.slow
async def test_a_cancelled_scan_is_stopped_and_frees_its_thread(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with opened("file", tmp_path, request, bulk=True, read_timeout=60, max_scans=1) as store:
        assert isinstance(store, SQLiteStore)
        started = time.monotonic()
        await store.list_messages(ListQuery(q="zq"))
        whole_scan = time.monotonic() - started
        assert whole_scan > 0.3, "the bulk store scans too fast for this test to mean much"

        scan = asyncio.ensure_future(store.list_messages(ListQuery(q="zq")))
        await asyncio.sleep(0.05)
        scan.cancel()
        cancelled = time.monotonic()
        # The one scan thread takes this next job once the stopped scan has let go.
        assert store._pools is not None
        await asyncio.wrap_future(store._pools.scanners._executor.submit(lambda: None))
        assert time.monotonic() - cancelled < whole_scan / 2
        assert scan.cancelled()


@pytest.mark.postgres
@pytest.mark.slow
async def test_a_cancelled_read_is_cancelled_on_the_server(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with opened("postgres", tmp_path, request, bulk=True, read_timeout=60) as store:
        scan = asyncio.ensure_future(store.list_messages(ListQuery(q="zq")))
        await asyncio.sleep(0.05)
        scan.cancel()
        running = (
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
            " AND query LIKE '%text_folded LIKE%' AND pid <> pg_backend_pid()"
        )
        deadline = time.monotonic() + 2
        while (await store.query(running))[0][0] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert (await store.query(running))[0][0] == 0


@pytest.mark.parametrize("kind", BACKENDS)
async def test_scans_past_the_limit_wait_their_turn_then_give_up(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with opened(kind, tmp_path, request, bulk=False, read_timeout=0.3, max_scans=1) as store:
        await store.insert(msg("m1"))
        async with occupied_scan_slot(store):
            started = time.monotonic()
            with pytest.raises(QueryTooExpensive):
                await store.list_messages(ListQuery(q="he"))
            assert time.monotonic() - started >= 0.25  # it waited for a turn
            # Reads that use an index are not limited.
            page = await store.list_messages(ListQuery(q="hello"))
            assert [m.message_id for m in page.data] == ["m1"]
        # Once the slot is free, the same scan goes through.
        page = await store.list_messages(ListQuery(q="he"))
        assert [m.message_id for m in page.data] == ["m1"]


@asynccontextmanager
async def occupied_scan_slot(store: AnyStore) -> AsyncIterator[None]:
    if isinstance(store, PostgresStore):
        async with store._scan_slots:
            yield
    else:
        assert store._pools is not None
        with blocked(store._pools.scanners, 1):
            yield


@pytest.mark.parametrize("kind", BACKENDS)
async def test_readiness_and_writes_do_not_wait_behind_busy_readers(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with opened(kind, tmp_path, request, bulk=False, read_timeout=0.3) as store:
        async with all_readers_busy(store):
            await asyncio.wait_for(store.ping(), 1.0)
            assert await asyncio.wait_for(store.insert(msg("m1")), 2.0) is True
            with pytest.raises(StorageUnavailable):
                await store.list_messages(ListQuery())
        page = await store.list_messages(ListQuery())
        assert [m.message_id for m in page.data] == ["m1"]


@asynccontextmanager
async def all_readers_busy(store: AnyStore) -> AsyncIterator[None]:
    if isinstance(store, PostgresStore):
        pool = store._read_pool
        held = [await pool.acquire() for _ in range(pool.get_max_size())]
        try:
            yield
        finally:
            for conn in held:
                await pool.release(conn)
    else:
        assert store._pools is not None
        pools = store._pools
        with blocked(pools.readers, 4), blocked(pools.scanners, 2):
            yield


@pytest.mark.postgres
async def test_reads_run_read_only_with_the_deadline_as_statement_timeout(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with opened("postgres", tmp_path, request, bulk=False, read_timeout=2.5) as store:
        settings = await store.query(
            "SELECT current_setting('statement_timeout'),"
            " current_setting('default_transaction_read_only'),"
            " current_setting('max_parallel_workers_per_gather')"
        )
        assert settings == [("2500ms", "on", "0")]


@pytest.mark.slow
@pytest.mark.parametrize("kind", BACKENDS)
def test_a_read_past_its_deadline_is_503_and_says_why(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cluster: PostgresCluster | None = None
    if kind == "postgres":
        cluster = request.getfixturevalue("postgres")
        url = cluster.create_database("bulk")
    else:
        url = f"sqlite:///{tmp_path / 'app.db'}"
    client = make_client(database_url=url, read_timeout_seconds=SHORT_DEADLINE)
    if cluster is not None:
        fill_postgres(cluster, url, rows=POSTGRES_ROWS)
    else:
        fill_sqlite(tmp_path / "app.db")
    capsys.readouterr()
    response = client.get("/messages", params={"q": "zq"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    detail = response.json()["detail"]
    assert detail.startswith("query too expensive")
    assert "3 or more characters" in detail
    assert client.metric("reads_stopped_total", reason="deadline") == 1
    lines = json_lines(capsys.readouterr().out)
    assert any(line["msg"] == "read too expensive" for line in lines)
    # A read that uses an index answers as always.
    assert client.get("/messages", params={"limit": 1}).status_code == 200


async def test_new_scans_wait_while_the_log_is_made_to_start_over(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with opened("file", tmp_path, request, bulk=False, read_timeout=0.3) as store:
        assert isinstance(store, SQLiteStore)
        checkpointer = store._checkpointer
        assert checkpointer is not None
        await store.insert(msg("m1"))
        # The checkpointer stopped, and its request to hold scans set by hand.
        await asyncio.to_thread(checkpointer.stop)
        checkpointer.holding_scans = True
        with pytest.raises(QueryTooExpensive):
            await store.list_messages(ListQuery(q="he"))
        page = await store.list_messages(ListQuery(q="hello"))
        assert [m.message_id for m in page.data] == ["m1"]
        checkpointer.holding_scans = False
        page = await store.list_messages(ListQuery(q="he"))
        assert [m.message_id for m in page.data] == ["m1"]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
async def test_scans_run_only_on_cores_nothing_else_wants(tmp_path: Path) -> None:
    store = await SQLiteStore.open(str(tmp_path / "a.db"))
    try:
        assert store._pools is not None
        pools = store._pools

        def policy() -> int:
            return os.sched_getscheduler(0)

        scan_policy = await asyncio.wrap_future(pools.scanners._executor.submit(policy))
        read_policy = await asyncio.wrap_future(pools.readers._executor.submit(policy))
        # A scan thread yields its core to any other thread that wakes up: the event loop,
        # the writer, a short read. Ordinary reads keep the ordinary policy.
        assert scan_policy == os.SCHED_IDLE
        assert read_policy == os.SCHED_OTHER
    finally:
        await store.close()
