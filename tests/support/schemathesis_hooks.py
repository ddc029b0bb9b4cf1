"""Schemathesis hooks: supply the values only the service or its sender can make.

- Signatures: the OpenAPI document describes X-Signature as 64 hex digits, and
  schemathesis fills it with random hex, which is always a 401. In a case whose headers
  were generated valid, a well-formed X-Signature is replaced by the real HMAC of the
  serialised body (computed over the bytes actually sent), and Standard Webhooks headers
  (any `webhook-*`) by a real id, timestamp and signature, so that generated messages
  reach validation and storage. Headers generated invalid (negative tests) are left
  alone: they must be refused.
- `cursor` of /messages and /conversations: opaque, issued by the service. In a query
  generated to be valid, a cursor is replaced by a real one (for a position derived from
  the generated value, in the order the query asks for).
- `since` and `until` of /stats/timeline: the document cannot say "since before until,
  at most so many buckets apart"; a valid query gets one day from its `since`.
- /feed/stream never ends: schemathesis reads a stream until the request's timeout (10 s
  by default) and checks the events it got; STREAM_SECONDS is enough to get them.

Used by tests/reliability/test_contract_fuzz.py, which runs, from the repository root:

    SCHEMATHESIS_HOOKS=tests.support.schemathesis_hooks WEBHOOK_SECRET=... \\
        .venv/bin/schemathesis run http://127.0.0.1:8000/openapi.json --checks all
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import schemathesis
from schemathesis.core.parameters import ParameterLocation

from app.config import standard_webhook_key
from app.models import encode_cursor, instant_key
from app.signature import sign_standard_webhook

_WELL_FORMED = re.compile(r"[0-9a-fA-F]{64}")
STREAM_SECONDS = 1.5


_STANDARD_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
_WEBHOOK_ID = re.compile(r"[\x21-\x2d\x2f-\x7e]{1,256}")


def _body(request: Any) -> bytes:
    body = request.body or b""
    return body.encode() if isinstance(body, str) else bytes(body)


class SignBody:
    """A requests auth hook: computes X-Signature over the prepared (final) body."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()

    def __call__(self, request: Any) -> Any:
        digest = hmac.new(self.secret, _body(request), hashlib.sha256).hexdigest()
        request.headers["X-Signature"] = digest
        return request


class SignStandardWebhook:
    """A requests auth hook: Standard Webhooks id, timestamp and signature for the body."""

    def __init__(self, secret: str, webhook_id: object) -> None:
        self.key = standard_webhook_key(secret)
        valid = isinstance(webhook_id, str) and _WEBHOOK_ID.fullmatch(webhook_id)
        self.webhook_id = webhook_id if valid and isinstance(webhook_id, str) else "msg_fuzz"

    def __call__(self, request: Any) -> Any:
        now = int(time.time())
        for name in list(request.headers):
            if name.lower() in _STANDARD_HEADERS:
                del request.headers[name]
        request.headers["webhook-id"] = self.webhook_id
        request.headers["webhook-timestamp"] = str(now)
        request.headers["webhook-signature"] = sign_standard_webhook(
            self.webhook_id, now, _body(request), self.key
        )
        return request


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if case.operation.path == "/webhook" and case.method.upper() == "POST":
        headers = case.headers or {}
        if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER):
            return
        secret = os.environ["WEBHOOK_SECRET"]
        standard = {name.lower(): value for name, value in headers.items()}
        given = headers.get("X-Signature")
        if any(name in standard for name in _STANDARD_HEADERS):
            kwargs["auth"] = SignStandardWebhook(secret, standard.get("webhook-id"))
        elif isinstance(given, str) and _WELL_FORMED.fullmatch(given):
            kwargs["auth"] = SignBody(secret)
    elif case.operation.path == "/feed/stream":
        kwargs["timeout"] = STREAM_SECONDS
    elif isinstance(case.query, dict):
        negative = case.meta is not None and case.meta.is_negative_at(ParameterLocation.QUERY)
        if not negative:
            valid_query(case.operation.path, case.query)


def valid_query(path: str, query: dict[str, Any]) -> None:
    """Make the parts of a valid query that the document cannot describe valid too."""
    cursor = query.get("cursor")
    if path in ("/messages", "/conversations") and isinstance(cursor, str):
        # A cursor continues the order it was issued for; conversations are newest first.
        descending = path == "/conversations" or query.get("order") == "desc"
        query["cursor"] = encode_cursor("2025-01-15T10:00:00.000000000Z", cursor[:256], descending)
    elif path == "/stats/timeline" and ("since" in query or "until" in query):
        # `since` before `until`, within the bucket cap: one day from `since`.
        start = _instant(query.get("since")) or _instant(query.get("until"))
        if start is None or not datetime(1000, 1, 1, tzinfo=UTC) <= start <= _LATEST:
            start = datetime(2025, 1, 15, tzinfo=UTC)
        query["since"] = start.strftime("%Y-%m-%dT%H:%M:%SZ")
        query["until"] = (start + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


_LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def _instant(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        key = instant_key(value)
    except ValueError:
        return None
    return datetime.strptime(key[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
