"""What only the PostgreSQL backend has: folded counts, several pools on one database,
schema management, pg_trgm, collation, session settings, probes and init-db."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from app.models import ListQuery, Message, Stats
from app.storage import StorageUnavailable
from app.storage.migrations import BACKENDS, SCHEMA_VERSION, apply_postgres_schema, migrations
from app.storage.postgres.reads import list_page
from app.storage.postgres.sql import list_statement
from app.storage.postgres.store import PostgresStore, migrate
from tests.support.broken_stores import ReadThenInsert, TwoSnapshotStats
from tests.support.clients import MakeClient, message
from tests.support.postgres import PASSWORD, PostgresCluster, database_name
from tests.support.servers import ROOT

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

NO_FOLDING = 3600.0  # folds only when a test asks


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


def msg(message_id: str, sender: str = "+15550000000", **overrides: Any) -> Message:
    values: dict[str, Any] = {
        "message_id": message_id,
        "from": sender,
        "to": "+14155550100",
        "ts": "2025-01-15T10:00:00Z",
        "text": "Hello",
    }
    values.update(overrides)
    return Message.model_validate(values)


async def expected_stats(url: str) -> Stats:
    """/stats computed the slow way, from the rows themselves."""
    conn = await asyncpg.connect(url)
    try:
        counts = await conn.fetch(
            "SELECT from_msisdn, count(*) FROM messages GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 10"
        )
        summary = await conn.fetchrow(
            "SELECT count(*) AS total, count(DISTINCT from_msisdn) AS senders,"
            " (SELECT ts FROM messages ORDER BY ts_key, message_id LIMIT 1) AS first,"
            " (SELECT ts FROM messages ORDER BY ts_key DESC, message_id DESC LIMIT 1) AS last"
            " FROM messages"
        )
    finally:
        await conn.close()
    assert summary is not None
    return Stats.model_validate(
        {
            "total_messages": summary["total"],
            "senders_count": summary["senders"],
            "messages_per_sender": [{"from": f, "count": c} for f, c in counts],
            "first_message_ts": summary["first"],
            "last_message_ts": summary["last"],
        }
    )


async def test_stats_stay_exact_through_folds_and_deletes(
    store: PostgresStore, postgres: PostgresCluster, url: str
) -> None:
    # A fixed seed: the same walk every run, through every mix of folded and pending.
    rng = random.Random(6)
    senders = [f"+1555000{i:04}" for i in range(14)]
    next_id = 0
    for _ in range(60):
        action = rng.random()
        if action < 0.6:
            for _ in range(rng.randint(1, 12)):
                # Skewed, so the top ten changes hands as counts move.
                sender = senders[min(int(rng.expovariate(0.25)), len(senders) - 1)]
                message_id = f"r{rng.randint(0, next_id)}" if rng.random() < 0.2 else f"r{next_id}"
                next_id += 1
                second = rng.randint(0, 59)
                await store.insert(msg(message_id, sender, ts=f"2025-01-15T10:00:{second:02}Z"))
        elif action < 0.8:
            assert await store.fold() >= 0
        else:
            postgres.execute(
                "DELETE FROM messages WHERE message_id = ANY ($1)",
                [f"r{rng.randint(0, next_id)}" for _ in range(rng.randint(1, 8))],
                database=database_name(url),
            )
        assert await store.stats() == await expected_stats(url)
    await store.fold()
    assert await store.stats() == await expected_stats(url)
    expected = await expected_stats(url)
    assert (await store.list_messages(ListQuery())).total == expected.total_messages


async def test_a_pending_sender_can_overtake_the_folded_top_ten(store: PostgresStore) -> None:
    for i in range(12):
        for j in range(3):
            await store.insert(msg(f"f{i}-{j}", f"+1555000{i:04}"))
    await store.fold()
    for j in range(5):
        await store.insert(msg(f"late{j}", "+19990000000"))
    stats = await store.stats()
    assert stats.messages_per_sender[0].from_ == "+19990000000"
    assert stats.messages_per_sender[0].count == 5
    assert [s.count for s in stats.messages_per_sender[1:]] == [3] * 9
    assert (stats.total_messages, stats.senders_count) == (41, 13)


async def test_a_pending_delete_can_drop_a_sender_out_of_the_top_ten(
    store: PostgresStore, url: str
) -> None:
    # Eleven folded senders: the first has 4 messages, the others 3 each.
    for i in range(11):
        for j in range(4 if i == 0 else 3):
            await store.insert(msg(f"f{i}-{j}", f"+1555000{i:04}"))
    await store.fold()
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DELETE FROM messages WHERE message_id IN ('f0-0', 'f0-1', 'f0-2')")
    finally:
        await conn.close()
    stats = await store.stats()
    assert stats == await expected_stats(url)
    assert "+15550000010" in [s.from_ for s in stats.messages_per_sender]
    assert "+15550000000" not in [s.from_ for s in stats.messages_per_sender]


async def stats_total_while_a_fold_commits(store: TwoSnapshotStats | PostgresStore) -> int:
    for i in range(40):
        await store.insert(msg(f"s{i}"))
    reading = asyncio.create_task(store.stats())
    if isinstance(store, TwoSnapshotStats):
        await asyncio.sleep(0)
        await store.first_read_done.wait()
    else:
        await asyncio.sleep(0.01)
    assert await store.fold() == 1
    return (await reading).total_messages


async def test_stats_read_one_snapshot_while_a_fold_commits(store: PostgresStore) -> None:
    assert await stats_total_while_a_fold_commits(store) == 40


async def test_a_two_snapshot_stats_read_is_caught(url: str) -> None:
    broken = await TwoSnapshotStats.open(url, fold_interval=NO_FOLDING)
    try:
        assert await stats_total_while_a_fold_commits(broken) != 40
    finally:
        await broken.close()


async def created_across_two_replicas(replicas: list[PostgresStore]) -> int:
    """60 ids, each delivered 4 times at once, twice through each replica."""
    senders = [f"+1555100{i:04}" for i in range(5)]
    jobs = [
        replicas[copy % 2].insert(msg(f"dup{i}", senders[i % 5]))
        for i in range(60)
        for copy in range(4)
    ]
    return sum(await asyncio.gather(*jobs))


async def test_two_replicas_store_one_row_per_id_and_count_exactly(
    url: str, postgres: PostgresCluster
) -> None:
    # Folding every 10 ms on both, so that folds race with the inserts and each other.
    replicas = [await PostgresStore.open(url, pool_size=8, fold_interval=0.01) for _ in range(2)]
    try:
        assert await created_across_two_replicas(replicas) == 60
        rows = postgres.fetch("SELECT message_id FROM messages", database=database_name(url))
        assert sorted(r[0] for r in rows) == sorted(f"dup{i}" for i in range(60))
        for replica in replicas:
            stats = await replica.stats()
            assert stats.total_messages == 60
            assert stats.senders_count == 5
            assert [s.count for s in stats.messages_per_sender] == [12] * 5
        # The background folders empty the deltas by themselves (bounded wait, no timing).
        for _ in range(500):
            if await replicas[0].query("SELECT count(*) FROM message_count_deltas") == [(0,)]:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the folders never caught up")
        assert await replicas[1].stats() == await expected_stats(url)
    finally:
        for replica in replicas:
            await replica.close()


async def test_read_before_write_is_caught_by_the_replica_test(url: str) -> None:
    replicas = [await ReadThenInsert.open(url, fold_interval=NO_FOLDING) for _ in range(2)]
    try:
        assert await created_across_two_replicas(replicas) > 60
    finally:
        for replica in replicas:
            await replica.close()


async def test_schema_applies_once_when_replicas_start_together(
    postgres: PostgresCluster,
) -> None:
    url = postgres.create_database("race")
    before = await asyncio.gather(*(migrate(url) for _ in range(6)))
    assert sorted(before) == [0] + [SCHEMA_VERSION] * 5
    versions = postgres.fetch(
        "SELECT version FROM schema_version ORDER BY version", database=database_name(url)
    )
    assert versions == [(version,) for version in range(1, SCHEMA_VERSION + 1)]


def test_every_backend_ships_every_schema_version() -> None:
    # The same versions on every backend, every one from 1 up to SCHEMA_VERSION: an upgrade
    # applies the versions above the database's, so a gap filled later would never run.
    shipped = {backend: [version for version, _ in migrations(backend)] for backend in BACKENDS}
    assert all(versions == list(range(1, SCHEMA_VERSION + 1)) for versions in shipped.values())


async def test_ordering_is_code_point_order_under_any_database_locale(
    postgres: PostgresCluster,
) -> None:
    # An ICU en-US database sorts "a" < "B" and ignores "_": the columns must not.
    postgres.execute(
        "CREATE DATABASE icu_en TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
        " LOCALE 'C.UTF-8'"
    )
    store = await PostgresStore.open(postgres.url("icu_en"), fold_interval=NO_FOLDING)
    try:
        ids = ["B", "a", "_x", "Z", "é", "a_b", "ab", "A"]
        for message_id in ids:
            await store.insert(msg(message_id))
        for i, sender in enumerate(["+20000000000", "+1000000000", "+33"]):
            await store.insert(msg(f"s{i}", sender))
        page = await store.list_messages(ListQuery())
        assert [m.message_id for m in page.data] == sorted([*ids, "s0", "s1", "s2"])
        stats = await store.stats()
        ranked = [s.from_ for s in stats.messages_per_sender]
        assert ranked == ["+15550000000", "+1000000000", "+20000000000", "+33"]
    finally:
        await store.close()


async def test_q_is_exact_without_pg_trgm(postgres: PostgresCluster) -> None:
    # A role that may create tables but not extensions: the schema must still apply.
    postgres.execute("CREATE DATABASE plain_db")
    postgres.execute(f"CREATE ROLE plain LOGIN PASSWORD '{PASSWORD}'")
    postgres.execute("GRANT CREATE ON SCHEMA public TO plain", database="plain_db")
    url = postgres.url("plain_db").replace("postgres:", "plain:", 1)
    store = await PostgresStore.open(url, fold_interval=NO_FOLDING)
    try:
        extensions = await store.query("SELECT extname FROM pg_extension")
        assert ("pg_trgm",) not in extensions
        texts = ["100% sure_thing", "Hello Bob", "hello back", "back\\slash", None]
        for i, text in enumerate(texts):
            await store.insert(msg(f"t{i}", text=text))
        for q, expected in [
            ("HELLO", ["t1", "t2"]),
            ("%", ["t0"]),
            ("_", ["t0"]),
            ("o_b", []),
            ("\\s", ["t3"]),
            ("lo", ["t1", "t2"]),
        ]:
            page = await store.list_messages(ListQuery(q=q))
            assert ([m.message_id for m in page.data], page.total) == (expected, len(expected))
    finally:
        await store.close()


async def test_q_uses_the_trigram_index_when_pg_trgm_is_there(
    store: PostgresStore, url: str
) -> None:
    indexes = await store.query("SELECT indexname FROM pg_indexes WHERE tablename = 'messages'")
    assert ("messages_text_trgm",) in indexes
    for i in range(50):
        await store.insert(msg(f"i{i}", text=f"note number {i}"))
    await store.insert(msg("needle", text="the Needle is here"))
    conn = await asyncpg.connect(url)
    try:
        # A table this small is cheaper to scan: forbid that to see the index can serve.
        await conn.execute("SET enable_seqscan = off")
        plan = await conn.fetch(
            "EXPLAIN SELECT message_id FROM messages WHERE text_folded LIKE $1 ESCAPE '\\'",
            "%needle%",
        )
    finally:
        await conn.close()
    assert any("messages_text_trgm" in line[0] for line in plan)
    page = await store.list_messages(ListQuery(q="NEEDLE"))
    assert [m.message_id for m in page.data] == ["needle"]


async def test_a_q_shorter_than_a_trigram_scans_the_table_not_the_index(
    store: PostgresStore, url: str
) -> None:
    # Such a term gives pg_trgm nothing to look up: through the index, every entry of it
    # is read, then every row rechecked (4x the time of a plain scan at a million rows).
    texts = {"pct": "100% sure", "und": "a_b", "bsl": "c\\d", "acc": "Ébène", "no": "plain"}
    for message_id, text in texts.items():
        await store.insert(msg(message_id, text=text))
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET enable_seqscan = off")  # the index, whenever it can serve

        async def plan(q: str) -> str:
            sql, args = list_statement(ListQuery(q=q))
            return "\n".join(row[0] for row in await conn.fetch(f"EXPLAIN {sql}", *args))

        assert "messages_text_trgm" in await plan("plain")
        assert "messages_text_trgm" not in await plan("la")
    finally:
        await conn.close()
    # Literal and folded, as a longer term is.
    for q, expected in [("%", ["pct"]), ("_", ["und"]), ("\\", ["bsl"]), ("éb", ["acc"])]:
        page = await store.list_messages(ListQuery(q=q))
        assert [m.message_id for m in page.data] == expected, q


async def test_a_page_of_a_short_term_walks_no_index(store: PostgresStore, url: str) -> None:
    # The planner guesses a third of the rows match a strpos(), so it would walk the
    # (ts_key, message_id) index for the page's order, fetching each row from the heap to
    # test it: all of them when the term matches nothing.
    for i in range(30):
        await store.insert(msg(f"w{i}", text=f"word {i}"))
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            # Plain scans made dear, as on a big table where the index walk looks cheaper.
            await conn.execute("SET LOCAL seq_page_cost = 1000")
            page = await list_page(conn, ListQuery(q="zq"))  # type: ignore[arg-type]
            scans = await conn.fetchval(
                "SELECT idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'messages'"
            )
    finally:
        await conn.close()
    assert (page.total, page.data) == (0, [])
    assert scans == 0


async def test_commits_wait_for_the_wal_flush_whatever_the_server_default(
    postgres: PostgresCluster,
) -> None:
    url = postgres.create_database("async_default")
    postgres.execute(f'ALTER DATABASE "{database_name(url)}" SET synchronous_commit = off')
    store = await PostgresStore.open(url, fold_interval=NO_FOLDING)

    async def show(conn: Any) -> str:
        return str(await conn.fetchval("SHOW synchronous_commit"))

    try:
        # The sessions that commit: the writes' (query() reads on the read pool).
        assert await store._with_connection(show, 5.0) == "on"
        assert await store._with_connection(show, 5.0, store._probe_pool) == "on"
    finally:
        await store.close()


async def test_start_up_waits_for_the_database_then_gives_up(postgres: PostgresCluster) -> None:
    closed_port = postgres.url().replace(str(postgres.port), "1", 1)
    with pytest.raises(StorageUnavailable, match="database not reachable"):
        await PostgresStore.open(closed_port, startup_timeout=0.5)


async def test_a_wrong_password_fails_at_once(postgres: PostgresCluster) -> None:
    with pytest.raises(StorageUnavailable, match="InvalidPasswordError"):
        await PostgresStore.open(postgres.url().replace(PASSWORD, "wrong"), startup_timeout=30)


def test_ready_requires_the_exact_schema_version(
    make_client: MakeClient, postgres: PostgresCluster
) -> None:
    url = postgres.create_database("probe")
    client = make_client(database_url=url)
    assert client.get("/health/ready").status_code == 200
    database = database_name(url)
    postgres.execute(
        "UPDATE schema_version SET version = $1", SCHEMA_VERSION + 1, database=database
    )
    assert client.get("/health/ready").status_code == 503
    postgres.execute("UPDATE schema_version SET version = $1", SCHEMA_VERSION, database=database)
    assert client.get("/health/ready").status_code == 200
    postgres.execute("ALTER TABLE messages RENAME TO messages_gone", database=database)
    assert client.get("/health/ready").status_code == 503
    response = client.post_signed(message())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    postgres.execute("ALTER TABLE messages_gone RENAME TO messages", database=database)
    assert client.get("/health/ready").status_code == 200
    assert client.post_signed(message()).status_code == 200


def init_db(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m app init-db` with exactly this environment."""
    return subprocess.run(
        [sys.executable, "-m", "app", "init-db"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_init_db_applies_the_schema_without_printing_the_password(
    postgres: PostgresCluster,
) -> None:
    url = postgres.create_database("cli")
    env = {"DATABASE_URL": url, "PATH": "/usr/bin:/bin"}
    for _ in range(2):
        result = init_db(env)
        assert result.returncode == 0, result.stderr
        assert (
            f"schema version {SCHEMA_VERSION} applied to PostgreSQL at 127.0.0.1" in result.stdout
        )
        assert PASSWORD not in result.stdout + result.stderr
    tables = postgres.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'", database=database_name(url)
    )
    assert {"messages", "sender_counts", "message_totals", "schema_version"} <= {
        t[0] for t in tables
    }


def test_init_db_on_an_unreachable_database_is_one_line(postgres: PostgresCluster) -> None:
    env = {
        "DATABASE_URL": postgres.url().replace(str(postgres.port), "1", 1),
        "DATABASE_STARTUP_TIMEOUT_SECONDS": "0",
        "PATH": "/usr/bin:/bin",
    }
    result = init_db(env)
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert "database not reachable" in result.stderr
    assert PASSWORD not in result.stderr


async def test_apply_is_a_no_op_on_a_current_database(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        assert await apply_postgres_schema(conn) == SCHEMA_VERSION
        assert await conn.fetchval("SELECT count(*) FROM schema_version") == SCHEMA_VERSION
    finally:
        await conn.close()


async def test_a_row_the_database_refuses_fails_alone(
    postgres: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    url = postgres.create_database("refuse")
    store = await PostgresStore.open(url, fold_interval=NO_FOLDING)
    try:
        postgres.execute(
            "ALTER TABLE messages ADD CONSTRAINT refuse_one CHECK (message_id <> 'bad')",
            database=database_name(url),
        )
        # Queued together, so they share one statement until "bad" spoils it.
        results = await asyncio.gather(
            store.insert(msg("good1")),
            store.insert(msg("bad")),
            store.insert(msg("good2")),
            return_exceptions=True,
        )
        assert results[0] is True
        assert isinstance(results[1], StorageUnavailable)
        assert results[2] is True
        assert await store.query("SELECT message_id FROM messages ORDER BY 1") == [
            ("good1",),
            ("good2",),
        ]
        assert "insert failed" in caplog.messages
        await store.ping()  # the database itself is fine
    finally:
        await store.close()


async def test_batches_sharing_ids_in_opposite_orders_do_not_deadlock(url: str) -> None:
    replicas = [await PostgresStore.open(url, fold_interval=NO_FOLDING) for _ in range(2)]
    blocker = await asyncpg.connect(url)
    try:
        # An uncommitted "m" holds both batches up after their first row, so each has
        # one id locked when the other reaches it: unsorted, that is a deadlock.
        await blocker.execute("BEGIN")
        await blocker.execute(
            "INSERT INTO messages (message_id, from_msisdn, to_msisdn, ts, ts_key, created_at)"
            " VALUES ('m', '+1', '+1', 't', 'k', 'c')"
        )
        first = asyncio.gather(*(replicas[0].insert(msg(i)) for i in ["a", "m", "z"]))
        second = asyncio.gather(*(replicas[1].insert(msg(i)) for i in ["z", "m", "a"]))
        for _ in range(500):
            waiting = await blocker.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            if waiting == 2:
                break
            await asyncio.sleep(0.02)
        await blocker.execute("ROLLBACK")
        outcomes = await asyncio.gather(first, second, return_exceptions=True)
        assert not [o for o in outcomes if isinstance(o, BaseException)]
        created = [c for o in outcomes if isinstance(o, list) for c in o]
        assert sorted(created) == [False, False, False, True, True, True]
    finally:
        await blocker.close()
        for replica in replicas:
            await replica.close()


def test_init_db_refuses_a_bad_startup_timeout(postgres: PostgresCluster) -> None:
    env = {
        "DATABASE_URL": postgres.url(),
        "DATABASE_STARTUP_TIMEOUT_SECONDS": "soon",
        "PATH": "/usr/bin:/bin",
    }
    result = init_db(env)
    assert result.returncode == 2
    assert "DATABASE_STARTUP_TIMEOUT_SECONDS" in result.stderr
    assert len(result.stderr.splitlines()) == 1
