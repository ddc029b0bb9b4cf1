"""A small client for a running receiver: `python -m app send`, `demo` and `follow`.

Standard library only (urllib), so it runs in the runtime image and on a host with a bare
python3, without the virtualenv.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from app.signature import sign


class BadURL(ValueError):
    """The base URL cannot be used; the message says why."""


class ServiceUnreachable(Exception):
    """No HTTP answer came back (refused, unknown host, timeout); the message says which."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    request_id: str | None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def check_base_url(url: str) -> str:
    """`http://host:port` (a trailing slash or a path prefix is fine), or BadURL."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadURL(f"--url must look like http://127.0.0.1:8000, got {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise BadURL(f"--url has an invalid port: {url!r}") from None
    if parts.query or parts.fragment:
        raise BadURL(f"--url must be a base URL, without ?query or #fragment: {url!r}")
    return url.strip().rstrip("/")


class Client:
    """HTTP calls to one receiver. Every status is a Reply; only no answer at all raises."""

    def __init__(
        self, base_url: str, *, timeout: float = 10.0, read_token: str | None = None
    ) -> None:
        self.base_url = check_base_url(base_url)
        self.timeout = timeout
        # Sent with reads (GET), for a service with READ_TOKENS set.
        self.read_token = read_token
        # No proxy: the service is usually on loopback, and an http_proxy from the
        # environment would otherwise intercept it.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def post_webhook(self, body: bytes, signature: str) -> Reply:
        headers = {"Content-Type": "application/json", "X-Signature": signature}
        return self.request("POST", "/webhook", body=body, headers=headers)

    def get(self, path: str) -> Reply:
        if self.read_token is None:
            return self.request("GET", path)
        return self.request("GET", path, headers={"Authorization": f"Bearer {self.read_token}"})

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        url = self.base_url + path
        # check_base_url let only http:// and https:// through.
        request = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return Reply(response.status, response.read(), response.headers["X-Request-ID"])
        except urllib.error.HTTPError as exc:
            with exc:
                return Reply(exc.code, exc.read(), exc.headers["X-Request-ID"])
        except urllib.error.URLError as exc:
            raise ServiceUnreachable(f"cannot reach {url}: {_describe(exc.reason)}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise ServiceUnreachable(f"cannot reach {url}: {_describe(exc)}") from None


def _describe(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the service running? `make up` or `make run`)"
    if isinstance(reason, TimeoutError):
        return "no answer in time"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def format_ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_message(message_id: str, sender: str, recipient: str, ts: str, text: str | None) -> bytes:
    """The exact bytes to sign and send (compact JSON, UTF-8)."""
    fields: dict[str, Any] = {"message_id": message_id, "from": sender, "to": recipient, "ts": ts}
    if text is not None:
        fields["text"] = text
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()


# The demo: a short conversation, then the three ways a delivery goes wrong or repeats.

_CONVERSATION = (
    ("+919876543210", "+14155550100", "Hi! Is my order on its way?"),
    ("+14155550100", "+919876543210", "Yes, it ships today. Tracking follows."),
    ("+919876543210", "+14155550100", "Great, thanks!"),
    ("+447700900123", "+14155550100", "Do you deliver to London?"),
)


@dataclass(frozen=True)
class DemoStep:
    label: str
    expected: int
    reply: Reply

    @property
    def ok(self) -> bool:
        return self.reply.status == self.expected


def run_demo(client: Client, secret: bytes, out: TextIO, now: datetime | None = None) -> bool:
    """Send the demo traffic, print each result and /stats; True if all went as expected.

    Message ids carry a fresh run id, so every run adds its own rows and shows the
    counts move.
    """
    run = secrets.token_hex(4)
    start = (now or datetime.now(UTC)) - timedelta(minutes=len(_CONVERSATION))
    print(f"Demo against {client.base_url} (run {run})", file=out)
    before = _total(client.get("/stats"))

    steps: list[DemoStep] = []

    def post(label: str, expected: int, body: bytes, key: bytes = secret) -> None:
        step = DemoStep(label, expected, client.post_webhook(body, sign(body, key)))
        steps.append(step)
        mark = "" if step.ok else f"   <- expected {expected}"
        print(f"  POST /webhook  {label:<52} {step.reply.status} {step.reply.text}{mark}", file=out)

    bodies = []
    for index, (sender, recipient, text) in enumerate(_CONVERSATION, start=1):
        ts = format_ts(start + timedelta(minutes=index))
        body = build_message(f"demo-{run}-{index}", sender, recipient, ts, text)
        bodies.append(body)
        post(f"demo-{run}-{index}  {sender} -> {recipient}", 200, body)
    post(f"demo-{run}-1 again (a redelivery: no second row)", 200, bodies[0])
    forged = build_message(f"demo-{run}-x", "+919876543210", "+14155550100", format_ts(start), "?")
    post(f"demo-{run}-x signed with the wrong secret", 401, forged, key=secret + b"-wrong")
    invalid = build_message(
        f"demo-{run}-y", "+919876543210", "+14155550100", "2025-02-30T10:00:00Z", None
    )
    post(f"demo-{run}-y with ts 2025-02-30 (no such day)", 422, invalid)

    stats = client.get("/stats")
    print(f"  GET  /stats    {'':<52} {stats.status}", file=out)
    if stats.status == 200:
        print(json.dumps(stats.json(), indent=2, ensure_ascii=False), file=out)
    elif stats.status == 401:
        print(
            "The service requires a read token: export READ_TOKENS (or put it in .env) as the"
            " service has it.",
            file=out,
        )

    all_ok = all(step.ok for step in steps) and stats.status == 200
    after = _total(stats)
    if before is not None and after is not None:
        added = after - before
        print(f"total_messages {before} -> {after}: {added} new", file=out)
        if added != len(_CONVERSATION) and all_ok:
            print(
                f"expected exactly {len(_CONVERSATION)} new messages (was someone else "
                "sending at the same time?)",
                file=out,
            )
            all_ok = False
    if steps[0].reply.status == 401:
        print(
            "The service rejected a correctly signed message: the WEBHOOK_SECRET here is not "
            "the one the service verifies with (make up: see .env or your exported value).",
            file=out,
        )
    print(
        "Every request answered as expected." if all_ok else "Some requests did not.",
        file=out,
    )
    return all_ok


def _total(reply: Reply) -> int | None:
    if reply.status != 200:
        return None
    total = reply.json().get("total_messages")
    return total if isinstance(total, int) else None


# `follow`: every message once, in feed order, resuming from a position file.

# How long the service may hold a poll open when nothing is new (GET /feed?wait=, at most 8).
FOLLOW_WAIT_SECONDS = 8
FOLLOW_RETRY_MAX_SECONDS = 5.0


class FollowRefused(Exception):
    """The service answered the feed with a status retrying cannot fix (401, 422, ...)."""


def read_position(path: str | None) -> int:
    """The position saved in `path` (0 if there is no file yet)."""
    if path is None:
        return 0
    try:
        with open(path, encoding="ascii") as file:
            text = file.read().strip()
    except FileNotFoundError:
        return 0
    if not text.isdigit():
        raise ValueError(f"{path} does not hold a position (a non-negative integer)")
    return int(text)


def write_position(path: str, position: int) -> None:
    """Replace the file's content atomically: a crash leaves the old or the new position."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="ascii") as file:
        file.write(f"{position}\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def follow(
    client: Client,
    out: TextIO,
    *,
    after: int = 0,
    sender: str | None = None,
    limit: int = 100,
    position_file: str | None = None,
    warn: TextIO | None = None,
) -> None:
    """Print every message after `after` as one JSON line, forever (until interrupted).

    The position is saved after each printed batch, so a restart prints nothing twice
    that it had saved, and at most the last batch again (at-least-once to `out`).
    """
    query = f"&limit={limit}&wait={FOLLOW_WAIT_SECONDS}"
    if sender is not None:
        query += "&from=" + urllib.parse.quote(sender)
    delay = 0.25
    while True:
        try:
            reply = client.get(f"/feed?after={after}{query}")
        except ServiceUnreachable as exc:
            reply = None
            reason = str(exc)
        if reply is not None and reply.status == 200:
            page = reply.json()
            for item in page["data"]:
                out.write(json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n")
            out.flush()
            if page["data"]:
                after = int(page["next_after"])
                if position_file is not None:
                    write_position(position_file, after)
            delay = 0.25
            continue
        if reply is not None and reply.status not in (429, 502, 503, 504):
            raise FollowRefused(f"GET /feed answered {reply.status}: {reply.text[:200]}")
        if reply is not None:
            reason = f"GET /feed answered {reply.status}"
        if warn is not None:
            print(f"{reason}; retrying in {delay:g} s", file=warn)
        time.sleep(delay)
        delay = min(delay * 2, FOLLOW_RETRY_MAX_SECONDS)
