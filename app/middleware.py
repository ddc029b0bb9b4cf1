"""The ASGI middleware around every request: id, timing, metrics, access log, headers."""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.access import AccessPolicy, Refusal
from app.logging_utils import AccessLog
from app.metrics import UNMATCHED_PATH, Metrics

access_log = AccessLog("app.access")
error_logger = logging.getLogger("app.error")

# What an incoming X-Request-ID must look like to be reused (else we mint one): short,
# printable and free of anything a log viewer or a header could misread.
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_SCOPE_KEY = "app.request_info"
_EXTRA_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
]
# After content-length and x-request-id, on every direct handler's answer.
_DIRECT_HEADERS = ((b"content-type", b"application/json"), *_EXTRA_HEADERS)
_GENERIC_500 = b'{"detail":"internal server error"}'
_LONG_NUMBER = re.compile(r"[0-9]{6,}")


@dataclass(slots=True)
class RequestInfo:
    """Per-request facts the access line carries; the webhook route fills in its part."""

    request_id: str
    # The route template for the metrics label, when FastAPI's router did not set one.
    route: str | None = None
    message_id: str | None = None
    dup: bool | None = None
    result: str | None = None
    # For a 422: where in the body the first problem is ("from"), never the value.
    field: str | None = None
    # The response's status once known; 500 until then (an error before any answer).
    status: int = 500
    response_started: bool = False


# A direct handler answers a request whole, as (status, JSON body, extra headers), and
# the middleware sends it: no `send` to wrap, no framework in between.
RawHeader = tuple[bytes, bytes]
DirectReply = tuple[int, bytes, list[RawHeader]]
DirectHandler = Callable[[Scope, Receive], Awaitable[DirectReply]]


class DirectRoutes:
    """The routes answered in front of the framework: exact path -> DirectHandler.

    For the hot path alone (POST /webhook): FastAPI's routing and dependencies cost
    several times the work of the handler itself. Every other path goes through the
    wrapped app. Paths are matched as Starlette's router matches them: without the
    `root_path` (the prefix a server mounts the app under).
    """

    __slots__ = ("_handlers",)

    def __init__(self, handlers: dict[str, DirectHandler]) -> None:
        self._handlers = dict(handlers)

    def match(self, path: str) -> DirectHandler | None:
        """The handler of `path` (without the root_path), if it is one of ours."""
        return self._handlers.get(path)

    def __contains__(self, path: str) -> bool:
        return path in self._handlers


def request_info(scope: Scope) -> RequestInfo:
    info: RequestInfo = scope[_SCOPE_KEY]
    return info


class ObservabilityMiddleware:
    """Outermost: every request gets an id, a timing, metrics and one access line.

    `policy` (app/access.py) decides first whether the request may go on at all, and a
    refusal is answered here. Requests that `direct` matches are answered by their
    handler, here; all others go to the wrapped app, with our headers added to its
    answer. `routes` are the app's fixed paths, so a refused request to one of them is
    still counted under its route template.
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        policy: AccessPolicy,
        direct: DirectRoutes | None = None,
        routes: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.policy = policy
        self.direct = direct or DirectRoutes({})
        self.routes = routes
        # Minted ids: a random per-instance prefix and a counter. Unique like a uuid4,
        # without reading the kernel's random pool on every request.
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket" and self._refuses_websocket(scope):
                # Before the handshake is accepted: the server answers it with a 403.
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        raw_headers = scope["headers"]
        # One pass over the headers for the request id and the Host, inline: this runs for
        # every request, and a call costs as much as the loop. Exactly one Host counts;
        # none, or two (ambiguous: RFC 9112 says 400), is no Host at all.
        incoming_id = host = None
        hosts = 0
        for name, value in raw_headers:
            if name == b"host":
                host = value
                hosts += 1
            elif name == b"x-request-id" and incoming_id is None:
                incoming_id = value
        if hosts != 1:
            host = None
        request_id = (
            incoming_id.decode("ascii")
            if incoming_id is not None and _SANE_REQUEST_ID.fullmatch(incoming_id)
            else f"{self._id_prefix}{next(self._id_counter):016x}"
        )
        info = scope[_SCOPE_KEY] = RequestInfo(request_id)
        encoded_id = request_id.encode("ascii")
        # The path as Starlette's router sees it: without the root_path the app is
        # mounted under.
        path: str = scope["path"]
        root_path = scope.get("root_path")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        policy = self.policy
        try:
            # The common case decided without a call: a Host allowed before, an open path.
            if host in policy.hosts_allowed and path in policy.open_paths:
                refusal = None
            else:
                refusal = policy.refusal(path, host, raw_headers)
            if refusal is not None:
                await self._refuse(refusal, path, send, info, encoded_id)
            elif (handler := self.direct.match(path)) is None:
                await self.app(scope, receive, _HeaderAdder(send, info, encoded_id).send)
            else:
                info.route = path
                # A delivery's line always says whether it was a duplicate.
                info.dup = False
                info.status, body, headers = await handler(scope, receive)
                info.response_started = True
                headers += (
                    (b"content-length", b"%d" % len(body)),
                    (b"x-request-id", encoded_id),
                    *_DIRECT_HEADERS,
                )
                await send(
                    {"type": "http.response.start", "status": info.status, "headers": headers}
                )
                await send({"type": "http.response.body", "body": body})
        except Exception as exc:
            # Logged with its frames but not its message, answered generically, and not
            # re-raised: the server would print it again, as plain text.
            error_logger.error(
                "unhandled error",
                exc_info=(type(exc), exc, exc.__traceback__),
                extra={"request_id": request_id},
            )
            info.status = 500
            if not info.response_started:
                await _HeaderAdder(send, info, encoded_id).send(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(_GENERIC_500)),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": _GENERIC_500})
        finally:
            latency_ms = (time.perf_counter() - started) * 1000
            path_label = info.route or getattr(scope.get("route"), "path", None) or UNMATCHED_PATH
            self.metrics.observe_request(path_label, scope["method"], info.status, latency_ms)
            _log_access(scope, info, info.status, latency_ms, path_label == UNMATCHED_PATH)

    def _refuses_websocket(self, scope: Scope) -> bool:
        # The same rule as for HTTP, so that a live feed added later is covered too.
        hosts = [value for name, value in scope["headers"] if name == b"host"]
        path: str = scope["path"]
        root_path = scope.get("root_path")
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        host = hosts[0] if len(hosts) == 1 else None
        return self.policy.refusal(path, host, scope["headers"]) is not None

    async def _refuse(
        self, refusal: Refusal, path: str, send: Send, info: RequestInfo, encoded_id: bytes
    ) -> None:
        info.status, body, headers, info.result = refusal
        # Counted under its route template when it names one, so a dashboard shows which
        # endpoint was refused; unknown paths share the unmatched label.
        if path in self.routes:
            info.route = path
        self.metrics.refusal(info.result)
        info.response_started = True
        headers = [
            *headers,
            (b"content-length", b"%d" % len(body)),
            (b"x-request-id", encoded_id),
            *_DIRECT_HEADERS,
        ]
        await send({"type": "http.response.start", "status": info.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _HeaderAdder:
    """The `send` given to the wrapped app: adds our headers, notes the status."""

    __slots__ = ("encoded_id", "info", "inner")

    def __init__(self, inner: Send, info: RequestInfo, encoded_id: bytes) -> None:
        self.inner = inner
        self.info = info
        self.encoded_id = encoded_id

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.info.status = message["status"]
            self.info.response_started = True
            headers = list(message.get("headers", ()))
            headers.append((b"x-request-id", self.encoded_id))
            headers.extend(_EXTRA_HEADERS)
            message = {**message, "headers": headers}
        await self.inner(message)


def _mask_numbers(path: str) -> str:
    return _LONG_NUMBER.sub(lambda match: match[0][:2] + "*" * (len(match[0]) - 2), path)


def _log_access(
    scope: Scope, info: RequestInfo, status: int, latency_ms: float, unmatched: bool
) -> None:
    # A refused signature is a 4xx like any other: scanners send them all day, and an
    # error log full of them would hide the errors that need someone.
    if status >= 500:
        level = logging.ERROR
    elif status >= 400:
        level = logging.WARNING
    else:
        level = logging.INFO
    if not access_log.enabled(level):
        return
    path = scope["path"][:256]
    access_log.request(
        level,
        info.request_id,
        scope["method"],
        # The path only: the query string can carry search terms and phone numbers. So can
        # a path that matched no route (/messages/+919876543210): long numbers are masked.
        _mask_numbers(path) if unmatched else path,
        status,
        round(latency_ms, 3),
        None if info.result is None else (info.message_id, info.dup, info.result, info.field),
    )
