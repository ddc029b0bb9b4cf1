"""Against a real uvicorn process on a loopback port, with a file database."""

from __future__ import annotations

import json
import sqlite3
import threading
import urllib.request
from pathlib import Path

import pytest

from app.signature import sign
from tests.support.clients import SECRET, encode, message
from tests.support.servers import running_server

pytestmark = pytest.mark.slow


def post(base_url: str, body: bytes, signature: str) -> int:
    request = urllib.request.Request(  # noqa: S310 - loopback only
        base_url + "/webhook",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "X-Signature": signature},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_concurrent_deliveries_of_one_id_store_one_row(tmp_path: Path) -> None:
    body = encode(message(message_id="race-1"))
    signature = sign(body, SECRET.encode())
    with running_server(tmp_path) as server:
        statuses: list[int] = []
        barrier = threading.Barrier(32)

        def deliver() -> None:
            barrier.wait()
            statuses.append(post(server.base_url, body, signature))

        threads = [threading.Thread(target=deliver) for _ in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses == [200] * 32
        assert server.stop() in (0, -15)  # uvicorn re-raises SIGTERM after a clean stop
        lines = server.log_lines()
    with sqlite3.connect(tmp_path / "app.db") as conn:
        rows = conn.execute("SELECT message_id FROM messages").fetchall()
        assert rows == [("race-1",)]
        assert conn.execute("SELECT total FROM message_totals").fetchone() == (1,)
    results = [json.loads(line).get("result") for line in lines]
    assert results.count("created") == 1
    assert results.count("duplicate") == 31


def test_every_line_the_server_prints_is_json(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        body = encode(message())
        assert post(server.base_url, body, sign(body, SECRET.encode())) == 200
        assert post(server.base_url, body, "0" * 64) == 401
        urllib.request.urlopen(server.base_url + "/metrics").read()  # noqa: S310
        server.stop()
        lines = server.log_lines()
    assert len(lines) >= 8
    parsed = [json.loads(line) for line in lines]
    messages = [entry["msg"] for entry in parsed]
    assert any("Started server process" in text for text in messages)
    assert any("Uvicorn running on" in text for text in messages)
    assert any("Finished server process" in text for text in messages)
    for entry in parsed:
        assert {"ts", "level", "msg"} <= set(entry)


def test_acknowledged_rows_survive_a_kill(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        acknowledged = []
        for index in range(20):
            body = encode(message(message_id=f"k{index}"))
            if post(server.base_url, body, sign(body, SECRET.encode())) == 200:
                acknowledged.append(f"k{index}")
        server.stop(sig=9)
    with sqlite3.connect(tmp_path / "app.db") as conn:
        stored = {row[0] for row in conn.execute("SELECT message_id FROM messages")}
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert len(acknowledged) == 20
    assert set(acknowledged) <= stored
