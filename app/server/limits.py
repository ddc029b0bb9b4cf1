"""uvicorn's httptools protocol with the limits uvicorn does not have.

Written against uvicorn 0.54's httptools protocol (app/server/__init__.py checks the
version before using it).

uvicorn (with httptools) buffers a request head of any size, gives a client unlimited
time to send its head and its body, and accepts connections until file descriptors run
out: one client can hold gigabytes of memory, and a few thousand slow or idle ones can
hold every file descriptor, so that accept() fails and every new client is reset.
`python -m app serve` runs with this protocol, which adds four limits:

- the request head (request line and headers) is at most `max_head_bytes`: 431 beyond;
- the head must arrive within `head_timeout` seconds of the connection opening or the
  request starting: 408 and close (a trickle of bytes does not reset it);
- the body must arrive within `body_timeout` seconds of the head: the connection is
  closed, and the app sees a client that went away;
- at most `max_connections` are open at once. At the limit, a new connection closes the
  connection that has been quiet longest (idle between requests, or still without a
  whole request head) to make room; only when every connection is inside a request is
  the new one refused: 503 `{"detail":"too many connections"}` with Retry-After, and
  close. Quiet connections cost a descriptor and nothing else, so keeping the new
  client is worth more than keeping the oldest quiet one, and a flood of connections
  that send nothing cannot lock anyone out.

uvicorn's keep-alive timeout (an idle connection is closed) is kept, by the same sweep.

A reverse proxy in front should enforce the same (see the README's Reliability section).

It also writes each response's head and the start of its body in one write(2), where
uvicorn makes one call for each (see app/server/coalescing.py).

The deadlines cost a float per request: no timer per request (a timer handle in uvloop is
an allocation, a heap push and a cancel, twice a request), but one sweep every
SWEEP_SECONDS over the open connections, so a limit is enforced within SWEEP_SECONDS of
falling due.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any, ClassVar

from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app.server.coalescing import CoalescingCycle

logger = logging.getLogger("app.server")

SWEEP_SECONDS = 0.5
# At most one line a while about connections evicted or refused at the limit.
LIMIT_LOG_SECONDS = 10.0
_REFUSALS = {
    408: (b"Request Timeout", b'{"detail":"request timeout"}'),
    431: (b"Request Header Fields Too Large", b'{"detail":"request header fields too large"}'),
    503: (b"Service Unavailable", b'{"detail":"too many connections"}'),
}


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = 65536
    head_timeout = 10.0
    body_timeout = 30.0
    max_connections = 1000
    retry_after = b"1"

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
        # loop.time() since when no request of this connection is inside the app (it is
        # idle, or still sending a head); 0 while one is. The limit evicts the oldest.
        self.quiet_since = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        now = self.loop.time()
        self._deadline = now + self.head_timeout
        self.quiet_since = now
        connections = _Connections.of(self.loop)
        if len(connections.open) >= self.max_connections:
            victim = connections.quietest()
            if victim is None:
                connections.limited("refused", self.app_state)
                self._refuse(503)
                return
            connections.limited("evicted", self.app_state)
            victim.evict()
        connections.watch(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline = 0.0
        _Connections.of(self.loop).release(self)
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
        self.quiet_since = 0.0
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
            self.quiet_since = self.loop.time()
            self._deadline = self.quiet_since + self.timeout_keep_alive

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        cycle.__class__ = CoalescingCycle
        super()._start_asgi_task(cycle, app)

    def check_deadline(self, now: float) -> None:
        if not self._deadline or now < self._deadline:
            return
        self._deadline = 0.0
        if self.transport.is_closing():
            return
        if self._idle:
            self._close()  # the keep-alive timeout, as uvicorn's
        elif self._reading_head and (self.cycle is None or self.cycle.response_complete):
            self._refuse(408)
        else:
            # Mid-body: the app is told the client went away.
            self._close()

    def evict(self) -> None:
        """Close this quiet connection to make room for a new one."""
        if self._idle:
            self._close()
        else:
            self._refuse(408)  # what its head timeout would have answered

    def _close(self) -> None:
        self._deadline = 0.0
        # Out of the count now: the descriptor is released as the transport closes, and
        # connection_lost comes a loop turn later.
        _Connections.of(self.loop).release(self)
        self.transport.close()

    def _refuse(self, status: int) -> None:
        reason, body = _REFUSALS[status]
        retry = b"retry-after: %b\r\n" % self.retry_after if status == 503 else b""
        self.transport.write(
            b"HTTP/1.1 %d %s\r\n" % (status, reason)
            + b"content-type: application/json\r\n"
            + b"content-length: %d\r\n" % len(body)
            + retry
            + b"x-content-type-options: nosniff\r\ncache-control: no-store\r\n"
            + b"connection: close\r\n\r\n"
            + body
        )
        self._close()


class _Connections:
    """The open connections of one event loop: counted for the limit, and swept for
    their deadlines twice a second."""

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Connections]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.open: set[GuardedHttpToolsProtocol] = set()
        self.scheduled = False
        # Evictions and refusals since the last line about them, and when that was.
        self.unreported: dict[str, int] = {}
        self.reported_at = float("-inf")

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Connections:
        connections = cls._by_loop.get(loop)
        if connections is None:
            connections = cls._by_loop[loop] = cls(loop)
        return connections

    def watch(self, connection: GuardedHttpToolsProtocol) -> None:
        self.open.add(connection)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_later(SWEEP_SECONDS, self.sweep)

    def release(self, connection: GuardedHttpToolsProtocol) -> None:
        self.open.discard(connection)

    def quietest(self) -> GuardedHttpToolsProtocol | None:
        """The connection quiet for longest, if any is quiet (a scan: only at the limit)."""
        quiet = [c for c in self.open if c.quiet_since and not c.transport.is_closing()]
        return min(quiet, key=lambda c: c.quiet_since) if quiet else None

    def limited(self, action: str, app_state: dict[str, Any]) -> None:
        metrics = app_state.get("metrics")
        if metrics is not None:
            metrics.connection_limited(action)
        self.unreported[action] = self.unreported.get(action, 0) + 1
        now = self.loop.time()
        if now - self.reported_at >= LIMIT_LOG_SECONDS:
            self.reported_at = now
            logger.warning(
                "connection limit reached",
                extra={"open": len(self.open), **self.unreported},
            )
            self.unreported = {}

    def sweep(self) -> None:
        now = self.loop.time()
        for connection in list(self.open):
            connection.check_deadline(now)
        # Runs only while connections are open; the next one starts it again.
        self.scheduled = bool(self.open)
        if self.scheduled:
            self.loop.call_later(SWEEP_SECONDS, self.sweep)


def guarded_protocol(
    *,
    max_head_bytes: int,
    head_timeout: float,
    body_timeout: float,
    max_connections: int = 1000,
    retry_after: int = 1,
) -> type[GuardedHttpToolsProtocol]:
    """The protocol class with these limits, for uvicorn's `http=` option."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "max_head_bytes": max_head_bytes,
            "head_timeout": head_timeout,
            "body_timeout": body_timeout,
            "max_connections": max_connections,
            "retry_after": str(retry_after).encode(),
        },
    )
