"""The console's session cookie: a read credential a browser holds after one sign-in.

The value is `<expiry>.<signature>`: the expiry in Unix seconds, and HMAC-SHA256 of it
under a key derived from the read token that was presented (HMAC(token, KEY_LABEL)). So:

- no secret of its own: every replica that knows READ_TOKENS verifies it;
- removing a token from READ_TOKENS ends every session opened with it;
- it expires (SESSION_TTL_SECONDS), whatever the browser does with Max-Age.

Verification tries the key of every configured token, all of them, with compare_digest,
so the time taken tells nothing about which token (or whether any) matched. Nothing here
knows HTTP beyond the Cookie header's bytes; the clock is a parameter (check() reads it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Sequence

from app.hashing import hmac_sha256

COOKIE = "console_session"
KEY_LABEL = b"webhook-receiver console session v1"
_VALUE = re.compile(rb"([1-9][0-9]{0,11})\.([A-Za-z0-9_-]{43})")

RawHeader = tuple[bytes, bytes]


def session_key(token: str) -> bytes:
    return hmac_sha256(token.encode(), KEY_LABEL)


def _signature(key: bytes, expires: bytes) -> bytes:
    return base64.urlsafe_b64encode(hmac_sha256(key, expires)).rstrip(b"=")


def cookie_value(token: str, now: float, ttl: int) -> str:
    """A session for `token`, valid for `ttl` seconds from `now`."""
    expires = str(int(now) + ttl).encode()
    return (expires + b"." + _signature(session_key(token), expires)).decode("ascii")


def cookie_values(headers: Iterable[RawHeader], name: str = COOKIE) -> list[bytes]:
    """Every value of cookie `name` in the request's Cookie headers."""
    wanted = name.encode() + b"="
    found = []
    for header, value in headers:
        if header != b"cookie":
            continue
        for part in value.split(b";"):
            part = part.strip()
            if part.startswith(wanted):
                found.append(part[len(wanted) :])
    return found


class SessionCookies:
    """Verifies session cookies against the keys of a set of read tokens.

    `check` has the shape of the access guard's credentials: True for a valid session,
    False for a cookie of ours that is not (expired, forged, or from a removed token),
    None when there is none.
    """

    __slots__ = ("_keys",)

    def __init__(self, tokens: Sequence[str]) -> None:
        self._keys = tuple(session_key(token) for token in tokens)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def valid(self, value: bytes, now: float) -> bool:
        match = _VALUE.fullmatch(value)
        if match is None or int(match[1]) <= now:
            return False
        expires, given = match[1], match[2]
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(_signature(key, expires), given)
        return matched

    def check(self, headers: Sequence[RawHeader]) -> bool | None:
        return self.check_at(headers, time.time())

    def check_at(self, headers: Sequence[RawHeader], now: float) -> bool | None:
        values = cookie_values(headers)
        if not values:
            return None
        # A browser sends one; several (one set by a sibling path or host) pass if any does.
        return any(self.valid(value, now) for value in values)


def token_matches(given: str, tokens: Sequence[str]) -> bool:
    """Whether `given` is one of `tokens`: digests compared, every one of them."""
    digest = hashlib.sha256(given.encode()).digest()
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(digest, hashlib.sha256(token.encode()).digest())
    return matched
