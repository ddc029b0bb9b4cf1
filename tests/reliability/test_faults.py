"""Storage faults against a real server: disk full, locked, read-only; then recovery.

Each fault must answer webhooks with 503 and Retry-After (never a 200 for a row that was not
committed), turn /health/ready to 503 while /health/live stays 200, keep the rows already
stored, and clear by itself once the fault is gone.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.battery import Connection, Reply, signed
from tests.support.clients import MakeClient, message
from tests.support.servers import SERVE, Server, running_server
from tests.support.tiers import record

pytestmark = [pytest.mark.reliability]


def stored_ids(db_path: Path) -> tuple[set[str], str]:
    conn = sqlite3.connect(db_path)
    try:
        ids = {row[0] for row in conn.execute("SELECT message_id FROM messages")}
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    return ids, integrity


def wait_for_status(client: Connection, path: str, status: int, attempts: int = 100) -> int:
    """Poll until `path` answers `status`; the last status seen."""
    seen = 0
    for _ in range(attempts):
        seen = client.request("GET", path).status
        if seen == status:
            break
        time.sleep(0.1)
    return seen


def assert_unavailable(reply: Reply) -> None:
    assert reply.status == 503
    assert reply.headers["retry-after"] == "1"
    assert json.loads(reply.body) == {"detail": "storage unavailable, retry later"}


def write_refusals(server: Server) -> list[str]:
    """The reasons the server logged for refused writes."""
    lines = [json.loads(line) for line in server.log_lines()]
    return [line["reason"] for line in lines if line.get("msg") == "write refused"]


@contextlib.contextmanager
def tiny_filesystem(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, size: int | None = None) -> None:
    """Write zeros to `path` until it has `size` bytes, or until the disk is full."""
    with open(path, "wb") as file:
        try:
            while size is None or file.tell() < size:
                file.write(b"\0" * 65536)
                file.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


@pytest.mark.slow
def test_disk_full_answers_503_keeps_rows_and_recovers(tmp_path: Path) -> None:
    with tiny_filesystem(tmp_path / "fs", "4m") as fs:
        # Ballast takes half the disk now, so that deleting it later gives the room back.
        ballast = fs / "ballast"
        fill(ballast, 2 * 1024 * 1024)
        with (
            running_server(tmp_path, db_path=fs / "app.db", command=SERVE) as server,
            Connection(server.base_url) as client,
        ):
            acked = []
            refused = None
            # The service's own writes fill the disk: its WAL and database hold every byte.
            for index in range(2000):
                body, signature = signed(f"m{index}", text="x" * 1000)
                reply = client.post_webhook(body, signature)
                if reply.status != 200:
                    refused = reply
                    break
                acked.append(f"m{index}")
            assert refused is not None, "the full disk never refused a write"
            assert_unavailable(refused)
            assert len(acked) > 10
            # A failed batch leaves room that a tiny probe write fits into: while writes
            # fail, readiness must say no all the same. A small message may still fit:
            # if it gets its 200 it is stored; if it gets a 503, it is not, and readiness
            # says no again.
            assert client.request("GET", "/health/ready").status == 503
            assert client.request("GET", "/health/live").status == 200
            refused_ids = []
            for attempt in range(4):
                body, signature = signed(f"still-full-{attempt}", text="x" * 500)
                reply = client.post_webhook(body, signature)
                if reply.status == 200:
                    acked.append(f"still-full-{attempt}")
                    continue
                assert_unavailable(reply)
                refused_ids.append(f"still-full-{attempt}")
                assert client.request("GET", "/health/ready").status == 503
            assert refused_ids, "a full disk took every write"
            assert client.request("GET", "/messages?limit=1").status == 200

            ballast.unlink()
            assert wait_for_status(client, "/health/ready", 200) == 200
            body, signature = signed("after")
            assert client.post_webhook(body, signature).status == 200
            server.stop()
            assert any("SQLITE_FULL" in reason for reason in write_refusals(server))
            stored, integrity = stored_ids(fs / "app.db")
    assert integrity == "ok"
    assert set(acked) | {"after"} <= stored
    assert not set(refused_ids) & stored
    record(
        "faults: disk full (4 MiB tmpfs)",
        f"503 + Retry-After after {len(acked)} rows, ready 503, recovered",
    )


@pytest.mark.slow
def test_locked_database_answers_503_then_recovers(tmp_path: Path) -> None:
    with (
        running_server(tmp_path, command=SERVE) as server,
        Connection(server.base_url) as client,
    ):
        body, signature = signed("before")
        assert client.post_webhook(body, signature).status == 200
        blocker = sqlite3.connect(tmp_path / "app.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            body, signature = signed("during")
            started = time.monotonic()
            reply = client.post_webhook(body, signature)
            locked_ms = (time.monotonic() - started) * 1000
            assert_unavailable(reply)
            assert client.request("GET", "/health/ready").status == 503
            assert client.request("GET", "/health/live").status == 200
            # Readers are not blocked by a writer in WAL mode.
            assert client.request("GET", "/messages").status == 200
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert wait_for_status(client, "/health/ready", 200) == 200
        body, signature = signed("after")
        assert client.post_webhook(body, signature).status == 200
        server.stop()
        # The busy timeout answered, not the longer write timeout.
        assert any("SQLITE_BUSY" in reason for reason in write_refusals(server))
        stored, integrity = stored_ids(tmp_path / "app.db")
    assert integrity == "ok"
    assert stored == {"before", "after"}
    record("faults: locked by another writer, time to 503", f"{locked_ms:.0f} ms")


def set_immutable(paths: list[Path], on: bool) -> bool:
    flag = "+i" if on else "-i"
    done = subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True, check=False)
    return done.returncode == 0


@pytest.mark.slow
def test_read_only_database_answers_503_then_recovers(tmp_path: Path) -> None:
    # chmod does not stop root; an immutable file does (ext4, xfs, btrfs).
    probe = tmp_path / "probe"
    probe.touch()
    if not set_immutable([probe], True):
        pytest.skip("chattr +i is not supported here (needs root and ext4, xfs or btrfs)")
    set_immutable([probe], False)
    db_path = tmp_path / "app.db"
    files = [db_path, tmp_path / "app.db-wal"]
    with (
        running_server(tmp_path, command=SERVE) as server,
        Connection(server.base_url) as client,
    ):
        body, signature = signed("before")
        assert client.post_webhook(body, signature).status == 200
        assert set_immutable(files, True)
        try:
            body, signature = signed("during")
            started = time.monotonic()
            reply = client.post_webhook(body, signature)
            read_only_ms = (time.monotonic() - started) * 1000
            assert_unavailable(reply)
            assert client.request("GET", "/health/ready").status == 503
            assert client.request("GET", "/health/live").status == 200
        finally:
            set_immutable(files, False)
        assert wait_for_status(client, "/health/ready", 200) == 200
        body, signature = signed("after")
        assert client.post_webhook(body, signature).status == 200
        server.stop()
        stored, integrity = stored_ids(db_path)
    assert integrity == "ok"
    assert stored == {"before", "after"}
    record("faults: read-only files, time to 503", f"{read_only_ms:.0f} ms")


def test_database_at_its_page_limit_answers_503_and_is_not_ready(
    make_client: MakeClient, db_path: Path
) -> None:
    # The in-process twin of the tmpfs test: SQLite's own size cap, no mount needed.
    client = make_client(database_url=f"sqlite:///{db_path}")
    assert client.post_signed(message(message_id="before")).status_code == 200
    assert client.portal is not None
    store = client.sqlite_store

    def cap(limit: int | None) -> None:
        def apply(conn: sqlite3.Connection) -> None:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            conn.execute(f"PRAGMA max_page_count = {limit if limit else pages}")

        assert client.portal is not None
        client.portal.call(store._write_call, apply)

    cap(None)
    statuses = [
        client.post_signed(message(message_id=f"m{index}", text="x" * 3000)).status_code
        for index in range(30)
    ]
    assert 503 in statuses
    assert set(statuses) <= {200, 503}
    assert client.get("/health/ready").status_code == 503
    assert client.get("/health/live").status_code == 200
    cap(1_000_000)
    assert client.get("/health/ready").status_code == 200
    assert client.post_signed(message(message_id="after")).status_code == 200
    acked = {f"m{index}" for index, status in enumerate(statuses) if status == 200}
    assert {row[0] for row in client.rows()} == {"before", "after"} | acked


@pytest.mark.slow
def test_readiness_checks_during_a_lock_do_not_delay_the_webhooks_503(tmp_path: Path) -> None:
    # Several probes (a load balancer, an orchestrator) ask at once while another process
    # holds the lock: their probe writes must not queue up in front of the deliveries.
    with (
        running_server(tmp_path, command=SERVE) as server,
        Connection(server.base_url) as client,
    ):
        body, signature = signed("before")
        assert client.post_webhook(body, signature).status == 200
        blocker = sqlite3.connect(tmp_path / "app.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            body, signature = signed("first")
            assert_unavailable(client.post_webhook(body, signature))  # now known unhealthy
            probes = [Connection(server.base_url) for _ in range(6)]
            threads = [
                threading.Thread(target=probe.request, args=("GET", "/health/ready"))
                for probe in probes
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for probe in probes:
                probe.close()
            body, signature = signed("second")
            assert_unavailable(client.post_webhook(body, signature))
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        server.stop()
        reasons = write_refusals(server)
    # Both refusals came from the busy timeout, not from the longer write timeout.
    assert len(reasons) == 2
    assert all("SQLITE_BUSY" in reason for reason in reasons), reasons
