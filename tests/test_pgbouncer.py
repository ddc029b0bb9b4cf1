"""The service through PgBouncer 1.18 in transaction mode (DATABASE_POOLER=pgbouncer).

Each transaction may run on another server session: nothing may rely on session state
(prepared statements, settings), and LISTEN needs PostgreSQL itself (DATABASE_DIRECT_URL).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from app.config import ConfigError, load_database_settings
from app.storage import QueryTooExpensive, StorageUnavailable
from app.storage.postgres import connection as postgres_connection
from tests.support.clients import AppClient, MakeClient, message
from tests.support.lifecycle import ADMIN_HEADERS, ADMIN_TOKENS
from tests.support.pgbouncer import running_pgbouncer, why_no_pgbouncer
from tests.support.postgres import PostgresCluster, database_name

pytestmark = pytest.mark.postgres

SENDERS = ["+15550000001", "+15550000002", "+15550000003"]


@pytest.fixture(scope="module")
def bouncer(postgres: PostgresCluster) -> Iterator[int]:
    reason = why_no_pgbouncer()
    if reason is not None:
        pytest.skip(reason)
    with running_pgbouncer(postgres) as port:
        yield port


def through(bouncer: int, direct_url: str) -> str:
    """The same database, through PgBouncer."""
    return direct_url.replace(direct_url.split("@", 1)[1].split("/", 1)[0], f"127.0.0.1:{bouncer}")


def pooled(bouncer: int, url: str, **overrides: Any) -> dict[str, Any]:
    return {
        "database_url": through(bouncer, url),
        "database_pooler": "pgbouncer",
        "database_direct_url": url,
        "database_pool_size": 10,
        **overrides,
    }


def exercise(client: AppClient) -> list[str]:
    """Writes, duplicates and every read, with concurrency; what went wrong, if anything."""
    problems: list[str] = []
    bodies = [
        message(message_id=f"pb-{index:03}", **{"from": SENDERS[index % 3]}) for index in range(60)
    ]
    with ThreadPoolExecutor(8) as pool:
        first = list(pool.map(lambda body: client.post_signed(body).status_code, bodies))
        again = list(pool.map(lambda body: client.post_signed(body).status_code, bodies[:20]))
        reads = list(pool.map(lambda path: client.get(path), ["/messages", "/stats"] * 10))
    if set(first + again) != {200} or {response.status_code for response in reads} != {200}:
        problems.append(f"statuses {sorted(set(first + again))}, reads {reads[0].status_code}")
    created = client.metric("webhook_requests_total", result="created")
    duplicates = client.metric("webhook_requests_total", result="duplicate")
    if (created, duplicates) != (60, 20):
        problems.append(f"{created} created, {duplicates} duplicates")
    page = client.get("/messages", params={"limit": 100})
    stats = client.get("/stats")
    feed = client.get("/feed", params={"limit": 100})
    if page.status_code != 200 or page.json()["total"] != 60:
        problems.append(f"/messages: {page.status_code} {page.text[:200]}")
    if stats.status_code != 200 or stats.json()["total_messages"] != 60:
        problems.append(f"/stats: {stats.status_code} {stats.text[:200]}")
    if feed.status_code != 200 or len(feed.json()["data"]) != 60:
        problems.append(f"/feed: {feed.status_code} {feed.text[:200]}")
    return problems


@pytest.mark.parametrize("statement_cache", [0, 100])
def test_the_service_works_through_pgbouncer_in_transaction_mode(
    postgres: PostgresCluster,
    bouncer: int,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
    statement_cache: int,
) -> None:
    # 100: asyncpg's statement cache on, as without DATABASE_POOLER; it must break.
    monkeypatch.setattr(postgres_connection, "POOLED_STATEMENT_CACHE_SIZE", statement_cache)
    url = postgres.create_database("bounced")
    try:
        problems = exercise(make_client(**pooled(bouncer, url)))
    except StorageUnavailable as exc:
        problems = [f"start-up: {exc}"]
    assert (problems == []) is (statement_cache == 0), problems


def test_reads_through_pgbouncer_keep_their_settings_and_deadline(
    postgres: PostgresCluster, bouncer: int, make_client: MakeClient
) -> None:
    url = postgres.create_database("deadline")
    client = make_client(**pooled(bouncer, url, read_timeout_seconds=1.5))
    settings = client.rows(
        "SELECT current_setting('transaction_read_only'), current_setting('statement_timeout'),"
        " current_setting('max_parallel_workers_per_gather'), current_setting('synchronous_commit')"
    )
    assert settings == [("on", "1500ms", "0", "on")]
    assert client.portal is not None
    with pytest.raises(QueryTooExpensive):
        client.portal.call(client.store.query, "SELECT pg_sleep(60)")
    # Stopped on the server, not only abandoned here; and the pool goes on.
    running = "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'"
    deadline = time.monotonic() + 20  # a hang guard: the server stops it within ms
    while postgres.fetch(running + " AND state = 'active'") != [(0,)]:
        assert time.monotonic() < deadline, "the read is still running on the server"
        time.sleep(0.05)
    assert client.post_signed(message()).status_code == 200
    assert client.get("/messages").json()["total"] == 1
    # A short term runs its page in a savepoint of the read's transaction.
    assert client.get("/messages", params={"q": "el"}).json()["total"] == 1
    assert client.get("/messages", params={"q": "zq"}).json()["total"] == 0


@pytest.mark.parametrize("listen", ["direct", "pgbouncer"])
def test_the_feed_wakes_other_replicas_through_the_direct_connection(
    postgres: PostgresCluster, bouncer: int, make_client: MakeClient, listen: str
) -> None:
    # pgbouncer: the feed's connection through the pooler too, as if DATABASE_DIRECT_URL
    # named it: nothing wakes the other replica (its readers still poll).
    url = postgres.create_database("wake")
    direct = url if listen == "direct" else through(bouncer, url)
    settings = pooled(bouncer, url, database_direct_url=direct)
    a, b = make_client(**settings), make_client(**settings)
    assert a.portal is not None
    seen = a.store.feed_signal.generation
    assert b.post_signed(message(message_id="via-b")).status_code == 200
    # A's signal moves only for its own commits and for what its LISTEN hears.
    heard = a.portal.call(a.store.feed_signal.wait, seen, 5.0 if listen == "direct" else 2.0)
    assert heard is (listen == "direct")
    data = a.get("/feed", params={"wait": 5}).json()["data"]
    assert [item["message_id"] for item in data] == ["via-b"]


def test_export_and_erasure_read_through_cursors_through_pgbouncer(
    postgres: PostgresCluster, bouncer: int, make_client: MakeClient
) -> None:
    # Both read through a named cursor in one transaction; asyncpg closes its statement
    # lazily, maybe on another server session: twice each.
    url = postgres.create_database("cursors")
    client = make_client(**pooled(bouncer, url, admin_tokens=ADMIN_TOKENS))
    for index in range(30):
        sender = SENDERS[index % 3]
        assert (
            client.post_signed(message(message_id=f"c-{index}", **{"from": sender})).status_code
            == 200
        )
    for _ in range(2):
        exported = client.get("/messages/export")
        assert exported.status_code == 200
        assert len(exported.text.splitlines()) == client.get("/messages").json()["total"]
    for sender in SENDERS[:2]:
        erased = client.delete(f"/numbers/{sender}", headers=ADMIN_HEADERS)
        assert erased.status_code == 200, erased.text
    assert client.get("/stats").json()["total_messages"] == 10


def test_synchronous_commit_off_for_the_role_is_refused_through_pgbouncer(
    postgres: PostgresCluster, bouncer: int, make_client: MakeClient
) -> None:
    url = postgres.create_database("async")
    postgres.execute(f'ALTER DATABASE "{database_name(url)}" SET synchronous_commit = off')
    with pytest.raises(StorageUnavailable, match="synchronous_commit is off"):
        make_client(**pooled(bouncer, url))


def test_a_pooler_without_a_direct_url_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:secret@pgbouncer:6432/app")
    monkeypatch.setenv("DATABASE_POOLER", "pgbouncer")
    monkeypatch.delenv("DATABASE_DIRECT_URL", raising=False)
    with pytest.raises(ConfigError, match="DATABASE_DIRECT_URL: must be set") as refused:
        load_database_settings()
    assert "secret" not in str(refused.value)
    monkeypatch.setenv("DATABASE_DIRECT_URL", "postgresql://app:secret@db:5432/app")
    assert load_database_settings().direct_database_url.endswith("@db:5432/app")
