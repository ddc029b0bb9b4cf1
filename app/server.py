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
from typing import Any, ClassVar

from uvicorn._types import ASGI3Application, ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

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
        # loop.time() by which the head or the body must have arrived; 0: no deadline.
        self._deadline = 0.0

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
        if not self._deadline:
            self._deadline = self.loop.time() + self.head_timeout

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._deadline = self.loop.time() + self.body_timeout
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._deadline = 0.0
        super().on_message_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        cycle.__class__ = _CoalescingCycle
        super()._start_asgi_task(cycle, app)

    def check_deadline(self, now: float) -> None:
        if not self._deadline or now < self._deadline:
            return
        self._deadline = 0.0
        if self.transport.is_closing():
            return
        if self._reading_head and (self.cycle is None or self.cycle.response_complete):
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


class _HeadCatcher:
    """Stands in for the transport while uvicorn writes a response head."""

    __slots__ = ("head",)

    def __init__(self) -> None:
        self.head = b""

    def write(self, data: bytes) -> None:
        self.head = data


class _Prefixed:
    """Stands in for the transport while uvicorn writes the first body message: the
    held head goes out with the first write, or before a close."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: asyncio.Transport, head: bytes) -> None:
        self.transport = transport
        self.head = head

    def write(self, data: bytes) -> None:
        head, self.head = self.head, b""
        self.transport.write(head + data if len(data) <= _JOIN_LIMIT else head)
        if len(data) > _JOIN_LIMIT:
            self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def flush(self) -> None:
        if self.head:
            head, self.head = self.head, b""
            self.transport.write(head)


# A body up to this size is copied behind the head; a larger one is written on its own.
_JOIN_LIMIT = 65536


class _CoalescingCycle(RequestResponseCycle):
    """uvicorn's request cycle, but the head waits for the first body message.

    uvicorn writes the head when the app sends http.response.start and the body when it
    sends http.response.body: two write(2) calls (and two segments) for every small
    response, a tenth of a webhook's cost. Here uvicorn's own code builds and checks the
    head as before, into a catcher; it is written with the first body bytes, or alone
    before a close, or once the response completes without body bytes (HEAD).
    """

    _held = b""

    async def send(self, message: ASGISendEvent) -> None:
        transport = self.transport
        # The stand-ins are only in place while uvicorn's send runs without pausing: with
        # writing paused (a slow reader), it waits for the buffer to drain, as before.
        if self.flow.write_paused:
            if self._held:
                transport.write(self._held)
                self._held = b""
            await super().send(message)
            return
        if message["type"] == "http.response.start" and not self.response_started:
            catcher = _HeadCatcher()
            self.transport = catcher  # type: ignore[assignment]
            try:
                await super().send(message)
            finally:
                self.transport = transport
            self._held = catcher.head
            return
        if not self._held:
            await super().send(message)
            return
        prefixed = _Prefixed(transport, self._held)
        self._held = b""
        self.transport = prefixed  # type: ignore[assignment]
        try:
            await super().send(message)
        finally:
            self.transport = transport
            if not transport.is_closing():
                prefixed.flush()


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
