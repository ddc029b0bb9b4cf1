"""Requests straight through the app's ASGI interface, in the test client's event loop,
with bodies that arrive (or stall) exactly when the caller says: for several requests at
once, and for timing what one request costs the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Message as AsgiMessage

from tests.support.clients import AppClient

Receive = Callable[[], Awaitable[AsgiMessage]]
Reply = tuple[int, dict[str, str], bytes]


def run(client: AppClient, scenario: Callable[[], Awaitable[Any]]) -> Any:
    """Run `scenario` in the app's event loop (where its store and budget live)."""
    assert client.portal is not None
    return client.portal.call(scenario)


async def call(client: AppClient, path: str, headers: dict[str, str], receive: Receive) -> Reply:
    """One POST through the app, as a server would make it; (status, headers, body)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        # A Host the service serves (ALLOWED_HOSTS), unless the caller names one.
        "headers": [
            (k.lower().encode(), v.encode()) for k, v in {"host": "127.0.0.1", **headers}.items()
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": dict(client.app_state),
    }
    sent: list[AsgiMessage] = []

    async def send(event: AsgiMessage) -> None:
        sent.append(event)

    await client.app(scope, receive, send)
    start = sent[0]
    names = {name.decode(): value.decode() for name, value in start["headers"]}
    return start["status"], names, b"".join(event.get("body", b"") for event in sent[1:])


def streamed(
    body: bytes, *, stall_after: int | None = None, go: asyncio.Event | None = None
) -> Receive:
    """A receive that hands `body` over in 10 kB chunks, waiting for `go` once
    `stall_after` bytes are out."""
    chunks = [body[i : i + 10_000] for i in range(0, len(body), 10_000)] or [b""]
    state = {"next": 0, "sent": 0}

    async def receive() -> AsgiMessage:
        if stall_after is not None and go is not None and state["sent"] >= stall_after:
            await go.wait()
        index = state["next"]
        state["next"] += 1
        state["sent"] += len(chunks[index])
        return {
            "type": "http.request",
            "body": chunks[index],
            "more_body": index + 1 < len(chunks),
        }

    return receive


async def longest_loop_work(
    client: AppClient, path: str, headers: dict[str, str], body: bytes
) -> tuple[Reply, float]:
    """POST `body` and the longest the event loop's thread worked without a turn for
    anything else meanwhile, in CPU seconds (which a busy machine does not inflate)."""
    longest = 0.0
    done = False

    async def watch() -> None:
        nonlocal longest
        last = time.thread_time()
        while not done:
            await asyncio.sleep(0.001)
            now = time.thread_time()
            longest = max(longest, now - last)
            last = now

    watcher = asyncio.ensure_future(watch())
    try:
        reply = await call(client, path, headers, streamed(body))
    finally:
        done = True
        await watcher
    return reply, longest
