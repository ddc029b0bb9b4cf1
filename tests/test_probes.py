"""Liveness, readiness, and how storage faults reach senders (SPEC sections 2.7 and 5)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from tests.support.clients import AppClient, MakeClient, message


def test_live_and_ready_on_a_fresh_store(file_client: AppClient) -> None:
    assert file_client.get("/health/live").status_code == 200
    ready = file_client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


def test_ready_on_memory_store(client: AppClient) -> None:
    assert client.get("/health/ready").status_code == 200


def test_ready_is_503_when_the_database_file_is_gone(file_client: AppClient, db_path: Path) -> None:
    assert file_client.get("/health/ready").status_code == 200
    db_path.unlink()
    response = file_client.get("/health/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable"}
    assert file_client.get("/health/live").status_code == 200


def test_ready_is_503_when_the_schema_is_missing(file_client: AppClient, db_path: Path) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.execute("DROP TABLE messages")
    assert file_client.get("/health/ready").status_code == 503


def test_ready_is_503_when_the_schema_version_is_unknown(
    file_client: AppClient, db_path: Path
) -> None:
    with sqlite3.connect(db_path) as conn:
        conn.execute("DELETE FROM schema_version")
    assert file_client.get("/health/ready").status_code == 503


def test_locked_database_answers_503_with_retry_after_then_recovers(
    make_client: MakeClient, db_path: Path
) -> None:
    client = make_client(database_url=f"sqlite:///{db_path}", sqlite_busy_timeout_ms=200)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        started = time.monotonic()
        response = client.post_signed(message())
        elapsed = time.monotonic() - started
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json() == {"detail": "storage unavailable, retry later"}
        assert elapsed < 5
        assert client.get("/health/ready").status_code == 503
        assert client.get("/health/live").status_code == 200
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert client.get("/health/ready").status_code == 200
    assert client.post_signed(message()).status_code == 200
    assert client.rows() == [("m1",)]
    assert client.metric("webhook_requests_total", result="storage_unavailable") == 1


def test_read_only_database_answers_503(make_client: MakeClient, db_path: Path) -> None:
    client = make_client(database_url=f"sqlite:///{db_path}")
    assert client.post_signed(message(message_id="before")).status_code == 200
    # A read-only file cannot be simulated by chmod when the tests run as root;
    # query_only gives the writer connection the same refusal (SQLITE_READONLY).
    writer = client.sqlite_store._writer.conn
    writer.execute("PRAGMA query_only = ON")
    try:
        response = client.post_signed(message(message_id="during"))
        assert response.status_code == 503
        assert "retry-after" in response.headers
        assert client.get("/health/ready").status_code == 503
    finally:
        writer.execute("PRAGMA query_only = OFF")
    assert client.get("/health/ready").status_code == 200
    assert client.post_signed(message(message_id="after")).status_code == 200
    assert client.rows() == [("after",), ("before",)]


def test_probes_answer_head(file_client: AppClient) -> None:
    assert file_client.head("/health/live").status_code == 200
    ready = file_client.head("/health/ready")
    assert ready.status_code == 200
    assert ready.content == b""
