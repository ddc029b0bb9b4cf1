"""The server's own limits, against a real `python -m app serve`: at most
HTTP_MAX_CONNECTIONS open connections (quiet ones make room, busy ones mean 503), and a
read stopped once its client has gone."""

from __future__ import annotations

import logging
import re
import resource
import socket
import time
from pathlib import Path

import pytest

from app.server import max_connections
from app.storage.sqlite.connection import init_sqlite
from tests.support.battery import Connection, host_port, signed, status_of
from tests.support.bulk import fill_sqlite
from tests.support.servers import SERVE, Server, running_server

# The open-files limit of the servers that must not run out of descriptors.
NOFILE = 256


def metric(server: Server, name: str) -> float:
    with Connection(server.base_url) as conn:
        text = conn.request("GET", "/metrics").body.decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found[1]) if found else 0.0


def read_until_closed(sock: socket.socket, limit: float = 10) -> bytes:
    sock.settimeout(limit)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


@pytest.mark.parametrize(
    ("configured", "soft_limit", "expected"),
    [
        (None, 1024, 1024 - 96),
        (None, 20_000, 1000),
        (None, resource.RLIM_INFINITY, 1000),
        (None, 50, 1),
        (300, 1024, 300),
        (5000, 1024, 1024 - 96),
    ],
)
def test_the_connection_limit_leaves_room_for_the_database_and_logs(
    configured: int | None, soft_limit: int, expected: int
) -> None:
    assert max_connections(configured, soft_limit) == expected


def test_a_limit_the_open_files_cannot_hold_is_lowered_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.server"):
        assert max_connections(5000, 1024) == 928
    assert "HTTP_MAX_CONNECTIONS" in caplog.text


@pytest.mark.slow
def test_idle_sockets_past_the_limit_make_room_for_real_clients(tmp_path: Path) -> None:
    command = ("prlimit", f"--nofile={NOFILE}:{NOFILE}", *SERVE)
    env = {"HTTP_MAX_CONNECTIONS": "100"}
    with running_server(tmp_path, command=command, env=env) as server:
        idle: list[socket.socket] = []
        try:
            # More idle sockets than the server has descriptors.
            for _ in range(3 * NOFILE // 2):
                idle.append(socket.create_connection(host_port(server.base_url)))
            for index in range(20):
                with Connection(server.base_url, timeout=5) as conn:
                    assert conn.request("GET", "/health/live").status == 200
                    body, signature = signed(f"through-{index}")
                    assert conn.post_webhook(body, signature).status == 200
            assert metric(server, 'http_connection_limit_total{action="evicted"}') >= 200
            assert metric(server, 'http_connection_limit_total{action="refused"}') == 0
        finally:
            for sock in idle:
                sock.close()


@pytest.mark.slow
def test_a_connection_past_a_limit_of_busy_ones_is_refused_with_503(tmp_path: Path) -> None:
    env = {"HTTP_MAX_CONNECTIONS": "5", "HTTP_BODY_TIMEOUT_SECONDS": "60"}
    body, signature = signed("slow")
    head = (
        f"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"X-Signature: {signature}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with running_server(tmp_path, command=SERVE, env=env) as server:
        time.sleep(0.5)  # the readiness check's connection is gone
        busy = [socket.create_connection(host_port(server.base_url)) for _ in range(5)]
        try:
            for sock in busy:
                sock.sendall(head + body[:10])  # inside a request: its body is on the way
            time.sleep(0.5)
            with socket.create_connection(host_port(server.base_url)) as sock:
                sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                answer = read_until_closed(sock)
            assert status_of(answer) == 503
            head_part, _, payload = answer.partition(b"\r\n\r\n")
            assert payload == b'{"detail":"too many connections"}'
            assert b"retry-after: 1\r\n" in head_part.lower()
            # The busy ones finish, and new clients get in again.
            for sock in busy:
                sock.sendall(body[10:])
                assert status_of(read_until_reply(sock)) == 200
        finally:
            for sock in busy:
                sock.close()
        with Connection(server.base_url, timeout=5) as conn:
            assert conn.request("GET", "/health/live").status == 200
        assert metric(server, 'http_connection_limit_total{action="refused"}') == 1


def read_until_reply(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    return data


@pytest.mark.slow
def test_a_read_whose_client_leaves_is_stopped(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    init_sqlite(str(db))
    fill_sqlite(db)
    env = {"READ_TIMEOUT_SECONDS": "60", "MAX_CONCURRENT_SCANS": "1"}
    with running_server(tmp_path, command=SERVE, env=env, db_path=db) as server:
        with socket.create_connection(host_port(server.base_url)) as sock:
            sock.sendall(b"GET /messages?q=zq HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            time.sleep(0.2)
        stopped = 'reads_stopped_total{reason="client_disconnected"}'
        deadline = time.monotonic() + 10
        while metric(server, stopped) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(server, stopped) == 1
        # The one scan thread is free again: the next scan is not queued behind it.
        with Connection(server.base_url, timeout=60) as conn:
            assert conn.request("GET", "/messages?q=zq&limit=1").status == 200
        lines = [line for line in server.log_lines() if '"path":"/messages"' in line]
        assert '"status":400' in lines[0]
