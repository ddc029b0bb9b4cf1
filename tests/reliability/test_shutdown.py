"""Graceful shutdown: SIGTERM under load finishes what is in flight and loses no 200."""

from __future__ import annotations

import random
import signal
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from tests.support.battery import Ledger, Senders, host_port, signed, status_of
from tests.support.servers import SERVE, start_server
from tests.support.tiers import TIER, record

pytestmark = [pytest.mark.slow, pytest.mark.reliability]


def stored_ids(db_path: Path) -> set[str]:
    conn = sqlite3.connect(db_path)
    try:
        return {row[0] for row in conn.execute("SELECT message_id FROM messages")}
    finally:
        conn.close()


def test_sigterm_under_load_loses_no_acknowledged_message(tmp_path: Path) -> None:
    rng = random.Random(3)
    db_path = tmp_path / "app.db"
    ledger = Ledger()
    senders = Senders(ledger, prefix="term")
    senders.start()
    exit_codes = []
    try:
        for _ in range(TIER.shutdowns):
            server = start_server(tmp_path, command=SERVE, db_path=db_path)
            senders.base_url = server.base_url
            senders.up.set()
            time.sleep(rng.uniform(0.3, 1.0))
            server.process.send_signal(signal.SIGTERM)
            exit_codes.append(server.process.wait(timeout=30))
            senders.up.clear()
    finally:
        senders.stop()
    stored = stored_ids(db_path)
    assert len(ledger.acked) > 10 * TIER.shutdowns, "the load never got going"
    assert ledger.acked <= stored
    # uvicorn ends a clean SIGTERM stop by re-raising the signal on itself.
    assert set(exit_codes) <= {0, -signal.SIGTERM}
    record("shutdown: SIGTERMs under load", TIER.shutdowns)
    record("shutdown: acknowledged, lost", f"{len(ledger.acked)}, {len(ledger.acked - stored)}")
    record("shutdown: deliveries cut off with no answer", len(ledger.unknown))


def test_a_request_in_flight_at_sigterm_is_answered_and_stored(tmp_path: Path) -> None:
    server = start_server(tmp_path, command=SERVE)
    body, signature = signed("in-flight")
    head = (
        f"POST /webhook HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"X-Signature: {signature}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection(host_port(server.base_url), timeout=10) as sock:
            sock.sendall(head + body[:10])
            time.sleep(0.2)  # the server has the headers: the request is in flight
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            # Still finishing the request; no longer accepting new connections.
            assert server.process.poll() is None
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(host_port(server.base_url), timeout=2).close()
            sock.sendall(body[10:])
            answer = sock.recv(65536)
        assert status_of(answer) == 200
        assert b"connection: close" in answer.lower()
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    assert stored_ids(tmp_path / "app.db") == {"in-flight"}
