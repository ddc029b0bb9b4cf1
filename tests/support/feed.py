"""Real consumers of a running service's feed: writers, a tight polling loop, an SSE reader."""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI

import app.main
from app.feed_hub import FeedHub
from app.signature import sign
from app.storage import MessageStore
from tests.support.clients import SECRET, encode, message


def connect(base_url: str, timeout: float = 15) -> http.client.HTTPConnection:
    parts = urlsplit(base_url)
    return http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)


def get_json(conn: http.client.HTTPConnection, path: str) -> Any:
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, (response.status, body[:200])
    return json.loads(body)


def write_concurrently(
    base_urls: Sequence[str],
    total: int,
    *,
    writers: int = 8,
    prefix: str = "x",
    text: Callable[[int], str] = lambda i: f"message {i}",
    max_pause: float = 0.002,
) -> list[str]:
    """`total` new messages from `writers` threads over the replicas; returns their ids."""
    ids = [f"{prefix}{i}" for i in range(total)]

    def writer(index: int) -> None:
        rng = random.Random(index)
        conns = [connect(url) for url in base_urls]
        try:
            for n, message_id in enumerate(ids[index::writers]):
                body = encode(message(message_id=message_id, text=text(n)))
                conn = conns[n % len(conns)]
                headers = {
                    "Content-Type": "application/json",
                    "X-Signature": sign(body, SECRET.encode()),
                }
                conn.request("POST", "/webhook", body=body, headers=headers)
                response = conn.getresponse()
                response.read()
                assert response.status == 200, response.status
                if max_pause:
                    time.sleep(rng.uniform(0, max_pause))
        finally:
            for conn in conns:
                conn.close()

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(writer, range(writers)))
    return ids


class Poller(threading.Thread):
    """A consumer in a tight loop on after = next_after, over the replicas in turn."""

    def __init__(self, base_urls: Sequence[str], limit: int = 100) -> None:
        super().__init__(daemon=True)
        self.base_urls = base_urls
        self.limit = limit
        self.seen: list[tuple[int, str]] = []
        self.writers_done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        conns = [connect(url) for url in self.base_urls]
        after, turn, quiet = 0, 0, 0
        try:
            # Until the writers are done and a few rounds in a row bring nothing new.
            while quiet < 2 * len(conns) + 4:
                page = get_json(conns[turn % len(conns)], f"/feed?after={after}&limit={self.limit}")
                turn += 1
                self.seen += [(item["position"], item["message_id"]) for item in page["data"]]
                after = page["next_after"]
                if page["data"] or not self.writers_done.is_set():
                    quiet = 0
                else:
                    quiet += 1
                    time.sleep(0.05)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            for conn in conns:
                conn.close()


class EventStream:
    """GET /feed/stream read event by event (http.client undoes the chunked framing)."""

    def __init__(self, base_url: str, query: str = "", headers: dict[str, str] | None = None):
        self.conn = connect(base_url, timeout=10)
        self.conn.request("GET", "/feed/stream" + query, headers=headers or {})
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("content-type", "").startswith("text/event-stream")
        self.retry: int | None = None

    def next_event(self) -> dict[str, str]:
        """The next event's fields (comments skipped; `retry` noted)."""
        fields: dict[str, str] = {}
        while True:
            line = self.response.readline()
            if not line:
                raise EOFError("the stream ended")
            text = line.decode().rstrip("\n")
            if not text:
                if "data" in fields:
                    return fields
                continue
            if text.startswith(":"):
                continue
            name, _, value = text.partition(": ")
            if name == "retry":
                self.retry = int(value)
            else:
                fields[name] = value

    def messages(self, count: int) -> list[tuple[int, str]]:
        got = []
        for _ in range(count):
            event = self.next_event()
            assert event["event"] == "message"
            item = json.loads(event["data"])
            assert int(event["id"]) == item["position"]
            got.append((item["position"], item["message_id"]))
        return got

    def close(self) -> None:
        self.conn.close()


def last_position(base_url: str) -> int:
    conn = connect(base_url)
    try:
        after = 0
        while True:
            page = get_json(conn, f"/feed?after={after}&limit=1000")
            if not page["data"]:
                return after
            after = page["next_after"]
    finally:
        conn.close()


def stalled_stream(base_url: str, after: int = 0) -> socket.socket:
    """A stream whose client reads the response head, then nothing ever again."""
    parts = urlsplit(base_url)
    sock = socket.create_connection((parts.hostname or "", parts.port or 80), timeout=10)
    sock.sendall(b"GET /feed/stream?after=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % after)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    if not head.startswith(b"HTTP/1.1 200"):
        sock.close()
        raise AssertionError(head)
    return sock


def drain_until_closed(sock: socket.socket, timeout: float = 20) -> bool:
    """Read what is buffered; True if the server closed the connection."""
    sock.settimeout(1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 20):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


class UnboundedHub(FeedHub):
    """Broken: keeps whatever a subscriber has not read, however much."""

    def __init__(self, store: MessageStore) -> None:
        super().__init__(store, subscriber_buffer_bytes=1 << 62)


def unbounded_feed_app() -> FastAPI:
    """`uvicorn --factory tests.support.feed:unbounded_feed_app`: a test-only broken build."""
    setattr(app.main, "FeedHub", UnboundedHub)  # noqa: B010 - mypy: a class is read-only
    return app.main.create_app()
