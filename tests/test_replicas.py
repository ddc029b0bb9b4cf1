"""Several real API processes on one PostgreSQL database: races, kills and an outage."""

from __future__ import annotations

import http.client
import json
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from app.signature import sign
from tests.support.clients import SECRET, encode, message
from tests.support.postgres import (
    PASSWORD,
    PostgresCluster,
    database_name,
    running_cluster,
    why_unavailable,
)
from tests.support.servers import Server, running_server

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

UVICORN = [sys.executable, "-m", "uvicorn", "--factory"]
SENDERS = ["+15550000001", "+15550000002", "+15550000003"]


def call(method: str, url: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {}
    if body is not None:
        headers = {"Content-Type": "application/json", "X-Signature": sign(body, SECRET.encode())}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310
            return response.status, lower_keys(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, lower_keys(exc.headers), exc.read()


def lower_keys(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def deliver(server: Server, body: bytes) -> int:
    """The status of one delivery; 0 when the replica could not be reached at all."""
    try:
        return call("POST", server.base_url + "/webhook", body)[0]
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError):
        return 0  # refused, or cut off mid-answer by the kill: not acknowledged


def metric(server: Server, result: str) -> float:
    text = call("GET", server.base_url + "/metrics")[2].decode()
    wanted = f'webhook_requests_total{{result="{result}"}} '
    for line in text.splitlines():
        if line.startswith(wanted):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {result} line in /metrics")


@contextmanager
def replicas(
    tmp_path: Path, url: str, count: int, factory: str = "app.main:create_app"
) -> Iterator[list[Server]]:
    with ExitStack() as stack:
        started = []
        for index in range(count):
            folder = tmp_path / f"replica{index}"
            folder.mkdir()
            started.append(
                stack.enter_context(
                    running_server(
                        folder,
                        env={"DATABASE_URL": url, "DATABASE_POOL_SIZE": "4"},
                        command=[*UVICORN, factory],
                    )
                )
            )
        yield started


def deliver_each_id_six_times(servers: list[Server]) -> tuple[list[int], dict[str, int]]:
    """40 ids; the six copies of each are in flight at once, spread over the replicas."""
    jobs = []
    expected: dict[str, int] = dict.fromkeys(SENDERS, 0)
    for i in range(40):
        sender = SENDERS[i % 3] if i % 4 else SENDERS[0]
        expected[sender] += 1
        body = encode(message(message_id=f"race-{i}", **{"from": sender}))
        jobs += [(servers[copy % len(servers)], body) for copy in range(6)]
    with ThreadPoolExecutor(24) as pool:
        statuses = list(pool.map(lambda job: deliver(*job), jobs))
    return statuses, expected


def test_replicas_store_each_id_once_and_agree_on_stats(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    url = postgres.create_database("replicas")
    with replicas(tmp_path, url, 3) as servers:
        statuses, expected = deliver_each_id_six_times(servers)
        assert statuses == [200] * 240
        rows = postgres.fetch(
            "SELECT message_id, count(*) FROM messages GROUP BY 1", database=database_name(url)
        )
        assert sorted(rows) == sorted((f"race-{i}", 1) for i in range(40))
        assert sum(metric(server, "created") for server in servers) == 40
        assert sum(metric(server, "duplicate") for server in servers) == 200
        ranked = sorted(expected.items(), key=lambda item: (-item[1], item[0]))
        for server in servers:
            stats = json.loads(call("GET", server.base_url + "/stats")[2])
            assert stats["total_messages"] == 40
            assert stats["senders_count"] == 3
            assert stats["messages_per_sender"] == [{"from": f, "count": c} for f, c in ranked]
            page = json.loads(call("GET", server.base_url + "/messages?limit=1")[2])
            assert page["total"] == 40


def test_read_before_write_replicas_are_caught(tmp_path: Path, postgres: PostgresCluster) -> None:
    url = postgres.create_database("racy")
    with replicas(tmp_path, url, 3, "tests.support.broken_stores:read_then_insert_app") as servers:
        statuses, _ = deliver_each_id_six_times(servers)
        assert statuses == [200] * 240
        # Still one row each (the primary key), but "created" is reported more than once.
        assert sum(metric(server, "created") for server in servers) > 40


def acknowledged_while_killing_a_replica(servers: list[Server]) -> list[str]:
    """Unique ids to both replicas from 8 senders; replica 0 is SIGKILLed mid-way."""
    acknowledged: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()

    def sender(worker: int) -> None:
        for n in range(120):
            message_id = f"w{worker}-{n}"
            target = servers[n % 2]
            if deliver(target, encode(message(message_id=message_id))) == 200:
                with lock:
                    acknowledged.append(message_id)
                    if len(acknowledged) >= 200 and not killed.is_set():
                        killed.set()
                        servers[0].process.send_signal(signal.SIGKILL)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(sender, range(8)))
    assert killed.is_set()
    servers[0].process.wait(timeout=10)
    return acknowledged


def stored_ids(postgres: PostgresCluster, url: str) -> set[str]:
    rows = postgres.fetch("SELECT message_id FROM messages", database=database_name(url))
    return {row[0] for row in rows}


def test_killing_a_replica_under_load_loses_no_acknowledged_message(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    url = postgres.create_database("kill")
    with replicas(tmp_path, url, 2) as servers:
        acknowledged = acknowledged_while_killing_a_replica(servers)
        # The survivor took its half throughout, the victim until it died.
        assert len(acknowledged) > 480
        stored = stored_ids(postgres, url)
        assert set(acknowledged) <= stored
        stats = json.loads(call("GET", servers[1].base_url + "/stats")[2])
        assert stats["total_messages"] == len(stored)


def test_acknowledging_before_the_commit_is_caught(
    tmp_path: Path, postgres: PostgresCluster
) -> None:
    url = postgres.create_database("early_ack")
    with replicas(tmp_path, url, 2, "tests.support.broken_stores:ack_before_commit_app") as servers:
        acknowledged = acknowledged_while_killing_a_replica(servers)
        time.sleep(1)  # let the survivor's late commits land: only the victim's are lost
        assert not set(acknowledged) <= stored_ids(postgres, url)


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    """A cluster this test may stop and start without disturbing the others."""
    reason = why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with running_cluster() as cluster:
        yield cluster


def wait_for(check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not hold in time")
        time.sleep(0.1)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_database_outage_answers_503_then_recovers_by_itself(
    tmp_path: Path, own_cluster: PostgresCluster, mode: str
) -> None:
    url = own_cluster.create_database("outage")
    with replicas(tmp_path, url, 1) as (server,):
        base = server.base_url
        assert deliver(server, encode(message(message_id="before"))) == 200
        own_cluster.stop(mode)  # immediate: as if the server crashed

        status, headers, body = call("POST", base + "/webhook", encode(message(message_id="x")))
        assert (status, headers.get("retry-after"), json.loads(body)) == (
            503,
            "1",
            {"detail": "storage unavailable, retry later"},
        )
        for path in ("/messages", "/stats"):
            status, headers, _ = call("GET", base + path)
            assert (status, headers.get("retry-after")) == (503, "1")
        assert call("GET", base + "/health/ready")[0] == 503
        assert call("GET", base + "/health/live")[0] == 200

        own_cluster.start()
        wait_for(lambda: call("GET", base + "/health/ready")[0] == 200)
        assert deliver(server, encode(message(message_id="after"))) == 200
        page = json.loads(call("GET", base + "/messages")[2])
        assert [row["message_id"] for row in page["data"]] == ["after", "before"]
        assert json.loads(call("GET", base + "/stats")[2])["total_messages"] == 2
        assert metric(server, "storage_unavailable") == 1
        server.stop()
        log = server.log_path.read_text(encoding="utf-8")
    assert PASSWORD not in log
    assert all(json.loads(line) for line in log.splitlines())
