"""The floor: the least a Python ASGI server can do for a durable, verified webhook.

Raw ASGI (no framework), the same checks as the service (HMAC over the raw bytes, strict
JSON, E.164 and timestamp rules), and the same durable group commit into SQLite (WAL,
synchronous=FULL, one writer thread). No logs, no metrics, no request ids: what is left
is the cost of the work itself, which the service is measured against.

    uvicorn --factory bench.floor:create_app
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import queue
import re
import sqlite3
import threading
from datetime import UTC, datetime
from typing import Any

E164 = re.compile(r"\+[1-9][0-9]{1,14}")
TS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?Z")
LIMIT = 65536


def valid(data: Any) -> bool:
    if not isinstance(data, dict):
        return False
    mid, frm, to, ts, text = (data.get(k) for k in ("message_id", "from", "to", "ts", "text"))
    if not isinstance(mid, str) or not 0 < len(mid) <= 256:
        return False
    if not (
        isinstance(frm, str) and E164.fullmatch(frm) and isinstance(to, str) and E164.fullmatch(to)
    ):
        return False
    if not (isinstance(ts, str) and TS.fullmatch(ts)):
        return False
    try:
        datetime(
            int(ts[:4]), int(ts[5:7]), int(ts[8:10]), int(ts[11:13]), int(ts[14:16]), int(ts[17:19])
        )
    except ValueError:
        return False
    return text is None or (isinstance(text, str) and len(text) <= 4096)


class Writer(threading.Thread):
    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(daemon=True)
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.loop = loop
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS messages (message_id TEXT PRIMARY KEY,"
            " from_msisdn TEXT NOT NULL, to_msisdn TEXT NOT NULL, ts TEXT NOT NULL, text TEXT,"
            " created_at TEXT NOT NULL)"
        )

    def run(self) -> None:
        while True:
            batch = [self.jobs.get()]
            while True:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            now = datetime.now(UTC).isoformat()
            self.conn.execute("BEGIN IMMEDIATE")
            done = [
                (
                    fut,
                    self.conn.execute(
                        "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        (*row, now),
                    ).rowcount,
                )
                for row, fut in batch
            ]
            self.conn.execute("COMMIT")
            self.loop.call_soon_threadsafe(settle, done)


def settle(done: list[tuple[asyncio.Future[int], int]]) -> None:
    for fut, count in done:
        if not fut.done():
            fut.set_result(count)


def create_app() -> Any:
    secret = os.environ["WEBHOOK_SECRET"].encode()
    path = os.environ.get("DATABASE_URL", "sqlite:///./floor.db").removeprefix("sqlite:///")
    state: dict[str, Writer] = {}

    async def reply(send: Any, status: int, body: bytes, request_id: bytes = b"") -> None:
        headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["writer"] = Writer(path, asyncio.get_running_loop())
                    state["writer"].start()
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > LIMIT:
                await reply(send, 413, b'{"detail":"payload too large"}')
                return
            if not message.get("more_body"):
                break
        headers = dict(scope["headers"])
        given = headers.get(b"x-signature", b"").lower()
        expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(expected, given):
            await reply(send, 401, b'{"detail":"invalid signature"}')
            return
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not valid(data):
            await reply(send, 422, b'{"detail":"invalid message"}')
            return
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        row = (data["message_id"], data["from"], data["to"], data["ts"], data.get("text"))
        state["writer"].jobs.put((row, fut))
        await fut
        # X-Request-ID is echoed so the benchmark can tell which deliveries were acknowledged.
        await reply(send, 200, b'{"status":"ok"}', headers.get(b"x-request-id", b""))

    return app
