"""Schemathesis hooks: supply the two values only the service or its sender can make.

- X-Signature: the OpenAPI document describes it as 64 hex digits, and schemathesis fills
  it with random hex, which is always a 401. A well-formed generated value is replaced by
  the real HMAC of the serialised body (computed over the bytes actually sent), so that
  generated messages reach validation and storage. A missing or malformed one (negative
  tests) is left alone: it must be a 401.
- `cursor` of /messages: opaque, issued by the service. In a query generated to be valid,
  a cursor is replaced by a real one (for a position derived from the generated value).

Used by tests/test_contract_fuzz.py, which runs, from the repository root:

    SCHEMATHESIS_HOOKS=tests.schemathesis_hooks WEBHOOK_SECRET=... \\
        .venv/bin/schemathesis run http://127.0.0.1:8000/openapi.json --checks all
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from typing import Any

import schemathesis
from schemathesis.core.parameters import ParameterLocation

from app.models import encode_cursor

_WELL_FORMED = re.compile(r"[0-9a-fA-F]{64}")


class SignBody:
    """A requests auth hook: computes X-Signature over the prepared (final) body."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def __call__(self, request: Any) -> Any:
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        request.headers["X-Signature"] = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        return request


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if case.operation.path == "/webhook" and case.method.upper() == "POST":
        given = (case.headers or {}).get("X-Signature")
        if isinstance(given, str) and _WELL_FORMED.fullmatch(given):
            kwargs["auth"] = SignBody(os.environ["WEBHOOK_SECRET"].encode())
    elif case.operation.path == "/messages" and isinstance(case.query, dict):
        cursor = case.query.get("cursor")
        negative = case.meta is not None and case.meta.is_negative_at(ParameterLocation.QUERY)
        if isinstance(cursor, str) and not negative:
            case.query["cursor"] = encode_cursor("2025-01-15T10:00:00.000000000Z", cursor[:256])
