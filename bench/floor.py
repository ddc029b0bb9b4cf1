"""The floor: the least a Python ASGI server can do for a durable, verified webhook.

Raw ASGI (no framework), the same checks as the service (HMAC over the raw bytes, strict
JSON, E.164 and timestamp rules), and the same durable insert with group commit: the
service's own store (app.storage.SQLiteStore: one writer thread, rows handed over once
per event-loop turn, one statement per group, the same schema with its indexes and the
triggers that keep /stats's aggregates in the inserting transaction, WAL with
synchronous=FULL, the search index filled behind). No framework, middleware, logs,
metrics or request ids: what is left is the cost of the work itself, and the service is
measured against it.

FLOOR_SCHEMA=bare runs the first version of this floor instead: a table with its primary
key and nothing else, a row per `execute` in its own writer thread. It does less work
than the service (no aggregates, no indexes, no search), and is kept to show by how much.

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

from app.models import Message
from app.storage import SQLiteStore

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


BARE_INSERT = "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"


class BareWriter(threading.Thread):
    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(daemon=True)
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.loop = loop
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS messages (message_id TEXT PRIMARY KEY,"
            " from_msisdn TEXT NOT NULL, to_msisdn TEXT NOT NULL, ts TEXT NOT NULL,"
            " text TEXT, created_at TEXT NOT NULL)"
        )

    async def insert(self, row: tuple[Any, ...]) -> None:
        future: asyncio.Future[int] = self.loop.create_future()
        self.jobs.put((row, future))
        await future

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
                (fut, self.conn.execute(BARE_INSERT, (*row, now)).rowcount) for row, fut in batch
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
    bare = os.environ.get("FLOOR_SCHEMA", "service") == "bare"
    state: dict[str, Any] = {}

    async def reply(send: Any, status: int, body: bytes, request_id: bytes = b"") -> None:
        headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if bare:
                        state["bare"] = BareWriter(path, asyncio.get_running_loop())
                        state["bare"].start()
                    else:
                        state["store"] = await SQLiteStore.open(path)
                    await send({"type": "lifespan.startup.complete"})
                else:
                    if not bare:
                        await state["store"].close()
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
        if bare:
            row = (data["message_id"], data["from"], data["to"], data["ts"], data.get("text"))
            await state["bare"].insert(row)
        else:
            await state["store"].insert(
                Message.model_construct(
                    message_id=data["message_id"],
                    from_=data["from"],
                    to=data["to"],
                    ts=data["ts"],
                    text=data.get("text"),
                )
            )
        # X-Request-ID is echoed so the benchmark can tell which deliveries were acknowledged.
        await reply(send, 200, b'{"status":"ok"}', headers.get(b"x-request-id", b""))

    return app
