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
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

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
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
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
        if self._deadline is None:
            self._arm(self.head_timeout)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._arm(self.body_timeout)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._reading_head and (self.cycle is None or self.cycle.response_complete):
            self._refuse(408)
        else:
            # Mid-body: the app is told the client went away.
            self.transport.close()

    def _refuse(self, status: int) -> None:
        self._disarm()
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
