"""uvicorn's httptools protocol with the limits uvicorn does not have.

uvicorn (with httptools) buffers a request head of any size, and gives a client unlimited
time to send its head and its body: one client can hold gigabytes of memory, and a few
thousand slow ones can hold every file descriptor. `python -m app serve` runs with this
protocol, which adds three limits:

- the request head (request line and headers) is at most `max_head_bytes`: 431 beyond;
- the head must arrive within `head_timeout` seconds of the connection opening or the
  request starting: 408 and close (a trickle of bytes does not reset it);
- the body must arrive within `body_timeout` seconds of the head: the connection is
  closed, and the app sees a client that went away.

uvicorn's keep-alive timeout (an idle connection is closed) is kept, by the same sweep.

A reverse proxy in front should enforce the same (see the README's Reliability section).

It also writes each response's head and the start of its body in one write(2), where
uvicorn makes one call for each (see _CoalescingCycle).

The deadlines cost a float per request: no timer per request (a timer handle in uvloop is
an allocation, a heap push and a cancel, twice a request), but one sweep a second over the
open connections, so a limit is enforced within a second of falling due.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any, ClassVar, cast

from uvicorn._types import (
    ASGI3Application,
    ASGISendEvent,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
)
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

SWEEP_SECONDS = 0.5
_REFUSALS = {
    408: b'{"detail":"request timeout"}',
    431: b'{"detail":"request header fields too large"}',
}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = 65536
    head_timeout = 10.0
    body_timeout = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # True from the connection opening or a request's first byte until its head is
        # complete; head bytes are counted only then.
        self._reading_head = True
        self._head_bytes = 0
        # loop.time() by which the head or the body must have arrived, or an idle
        # connection is closed (_idle: between requests); 0: no deadline.
        self._deadline = 0.0
        self._idle = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = self.loop.time() + self.head_timeout
        _Sweeper.of(self.loop).watch(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline = 0.0
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Counted after parsing, so a chunk that ends the head and carries the body is not
        # held against the head; the parser has then buffered at most one chunk too many.
        if self._reading_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(431)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = True
        self._head_bytes = 0
        if self._idle or not self._deadline:
            self._idle = False
            self._deadline = self.loop.time() + self.head_timeout

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._deadline = self.loop.time() + self.body_timeout
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._deadline = 0.0
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # uvicorn's, except for the keep-alive timeout: uvicorn arms a timer here and
        # cancels it when the next request arrives (an allocation, a heap push and a
        # cancel per request); here the idle connection gets a deadline for the sweep.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle = True
            self._deadline = self.loop.time() + self.timeout_keep_alive

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        cycle.__class__ = _CoalescingCycle
        super()._start_asgi_task(cycle, app)

    def check_deadline(self, now: float) -> None:
        if not self._deadline or now < self._deadline:
            return
        self._deadline = 0.0
        if self.transport.is_closing():
            return
        if self._idle:
            self.transport.close()  # the keep-alive timeout, as uvicorn's
        elif self._reading_head and (self.cycle is None or self.cycle.response_complete):
            self._refuse(408)
        else:
            # Mid-body: the app is told the client went away.
            self.transport.close()

    def _refuse(self, status: int) -> None:
        self._deadline = 0.0
        body = _REFUSALS[status]
        reason = b"Request Timeout" if status == 408 else b"Request Header Fields Too Large"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\n" % (status, reason)
            + b"content-type: application/json\r\n"
            + b"content-length: %d\r\n" % len(body)
            + b"x-content-type-options: nosniff\r\ncache-control: no-store\r\n"
            + b"connection: close\r\n\r\n"
            + body
        )
        self.transport.close()


class _CoalescingCycle(RequestResponseCycle):
    """uvicorn's request cycle, with a send that writes the head with the first body bytes.

    uvicorn writes the head when the app sends http.response.start and the body when it
    sends http.response.body: two write(2) calls (and two segments) for every small
    response, a tenth of a webhook's cost on the event loop. This send is uvicorn's
    (0.54), message for message, errors included, except that the head waits and leaves
    with the first body bytes (or alone, when there are none), and that header names and
    values are each checked in one regex search rather than one per header (the patterns
    are single characters, so that finds the same). tests/test_protocol.py holds it to
    uvicorn's framing.
    """

    _held = b""

    async def send(self, message: ASGISendEvent) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(
                    f"Expected ASGI message 'http.response.start', but got '{kind}'."
                )
            self.response_started = True
            self.waiting_for_100_continue = False
            start = cast("HTTPResponseStartEvent", message)
            status = start["status"]
            headers = [*self.default_headers, *start.get("headers", ())]
            if self.access_log:
                self.access_logger.info(
                    '%s - "%s %s HTTP/%s" %d',
                    get_client_addr(self.scope),
                    self.scope["method"],
                    get_path_with_query_string(self.scope),
                    self.scope["http_version"],
                    status,
                )
            self._held = self._head(status, headers)
            return
        if self.response_complete:
            raise RuntimeError(
                f"Unexpected ASGI message '{kind}' sent, after response already completed."
            )
        if kind != "http.response.body":
            raise RuntimeError(f"Expected ASGI message 'http.response.body', but got '{kind}'.")
        chunk = cast("HTTPResponseBodyEvent", message)
        body = chunk.get("body", b"")
        more_body = chunk.get("more_body", False)
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
            data = b""
        elif self.chunked_encoding:
            data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more_body:
                data += b"0\r\n\r\n"
        else:
            if len(body) > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= len(body)
            data = body
        if self._held:
            head, self._held = self._held, b""
            if len(data) > _JOIN_LIMIT:
                self.transport.write(head)
            else:
                data = head + data
        if data:
            self.transport.write(data)
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()

    def _head(self, status: int, headers: list[tuple[bytes, bytes]]) -> bytes:
        if HEADER_RE.search(b"".join(name for name, _ in headers)):
            raise RuntimeError("Invalid HTTP header name.")
        if HEADER_VALUE_RE.search(b"".join(value for _, value in headers)):
            raise RuntimeError("Invalid HTTP header value.")
        content = [STATUS_LINE[status]]
        has_connection_close = False
        for name, value in headers:
            name = name.lower()
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection":
                connection = [token.lower().strip() for token in value.split(b",")]
                if b"close" in connection:
                    self.keep_alive = False
                    has_connection_close = True
            content.extend([name, b": ", value, b"\r\n"])
        if not self.keep_alive and not has_connection_close:
            content.append(b"connection: close\r\n")
        if (
            self.chunked_encoding is None
            and self.scope["method"] != "HEAD"
            and status not in (204, 304)
        ):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        return b"".join(content)


# A body up to this size is copied behind the head; a larger one is written on its own.
_JOIN_LIMIT = 65536


class _Sweeper:
    """Checks every open connection's deadline, twice a second, on one event loop."""

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sweeper]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.connections: weakref.WeakSet[GuardedHttpToolsProtocol] = weakref.WeakSet()
        self.scheduled = False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Sweeper:
        sweeper = cls._by_loop.get(loop)
        if sweeper is None:
            sweeper = cls._by_loop[loop] = cls(loop)
        return sweeper

    def watch(self, connection: GuardedHttpToolsProtocol) -> None:
        self.connections.add(connection)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_later(SWEEP_SECONDS, self.sweep)

    def sweep(self) -> None:
        now = self.loop.time()
        for connection in list(self.connections):
            connection.check_deadline(now)
        # Runs only while connections are open; the next one starts it again.
        self.scheduled = bool(self.connections)
        if self.scheduled:
            self.loop.call_later(SWEEP_SECONDS, self.sweep)


def guarded_protocol(
    *, max_head_bytes: int, head_timeout: float, body_timeout: float
) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with these limits, for uvicorn's `http=` option."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "max_head_bytes": max_head_bytes,
            "head_timeout": head_timeout,
            "body_timeout": body_timeout,
        },
    )
