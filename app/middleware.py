"""The ASGI middleware around every request: id, timing, metrics, access log, headers."""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
    error: bool = False


# A direct handler answers a request whole, as (status, JSON body, extra headers), and
# the middleware sends it: no `send` to wrap, no framework in between. For the one hot
# path, POST /webhook; everything else goes through the wrapped app.
Header = tuple[bytes, bytes]
Reply = tuple[int, bytes, list[Header]]
DirectHandler = Callable[[Scope, Receive], Awaitable[Reply]]


def request_info(scope: Scope) -> RequestInfo:
    info: RequestInfo = scope[_SCOPE_KEY]
    return info


class ObservabilityMiddleware:
    def __init__(
        self, app: ASGIApp, metrics: Metrics, direct: dict[str, DirectHandler] | None = None
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.direct = direct or {}
        # Minted ids: a random per-instance prefix and a counter. Unique like a uuid4,
        # without reading the kernel's random pool on every request.
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _incoming_request_id(scope) or (
            f"{self._id_prefix}{next(self._id_counter):016x}"
        )
        info = scope[_SCOPE_KEY] = RequestInfo(request_id)
        encoded_id = request_id.encode("ascii")
        status = 500
        response_started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", encoded_id))
                headers.extend(_EXTRA_HEADERS)
                message = {**message, "headers": headers}
            await send(message)

        try:
            handler = self.direct.get(scope["path"])
            if handler is None:
                await self.app(scope, receive, send_with_headers)
            else:
                info.route = scope["path"]
                status, body, headers = await handler(scope, receive)
                response_started = True
                headers += (
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"x-request-id", encoded_id),
                    *_EXTRA_HEADERS,
                )
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
        except Exception as exc:
            # Logged with its frames but not its message, answered generically, and not
            # re-raised: the server would print it again, as plain text.
            error_logger.error(
                "unhandled error",
                exc_info=(type(exc), exc, exc.__traceback__),
                extra={"request_id": request_id},
            )
            status = 500
            if not response_started:
                await send_with_headers(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(_GENERIC_500)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": _GENERIC_500})
        finally:
            latency_ms = (time.perf_counter() - started) * 1000
            path_label = info.route or getattr(scope.get("route"), "path", None) or UNMATCHED_PATH
            self.metrics.observe_request(path_label, status, latency_ms)
            _log_access(scope, info, status, latency_ms, path_label == UNMATCHED_PATH)


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _SANE_REQUEST_ID.fullmatch(value):
                reused: str = value.decode("ascii")
                return reused
            break
    return None


def _mask_numbers(path: str) -> str:
    return _LONG_NUMBER.sub(lambda match: match[0][:2] + "*" * (len(match[0]) - 2), path)


def _log_access(
    scope: Scope, info: RequestInfo, status: int, latency_ms: float, unmatched: bool
) -> None:
    if status >= 500 or info.error:
        level = logging.ERROR
    elif status >= 400:
        level = logging.WARNING
    else:
        level = logging.INFO
    if not access_log.enabled(level):
        return
    fields: dict[str, Any] = {
        "request_id": info.request_id,
        "method": scope["method"],
        # The path only: the query string can carry search terms and phone numbers. So can
        # a path that matched no route (/messages/+919876543210): long numbers are masked.
        "path": _mask_numbers(scope["path"][:256]) if unmatched else scope["path"][:256],
        "status": status,
        "latency_ms": round(latency_ms, 3),
    }
    if info.result is not None:
        fields["message_id"] = info.message_id
        fields["dup"] = bool(info.dup)
        fields["result"] = info.result
    access_log.write(level, fields)
