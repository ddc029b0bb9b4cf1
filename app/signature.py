"""HMAC-SHA256 verification of webhook bodies. Pure functions; no HTTP here."""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence

_HEX_DIGEST = re.compile(rb"[0-9a-fA-F]{64}")


class InvalidSignature(Exception):
    """The signature is missing, malformed or does not match. Deliberately says no more."""


def sign(body: bytes, secret: bytes) -> str:
    """The lower-case hex HMAC-SHA256 of `body`: what a sender puts in X-Signature."""
    return hmac.digest(secret, body, "sha256").hex()


def verify_signature(body: bytes, header: str | None, secrets: Sequence[bytes]) -> int:
    """Check an X-Signature header against the raw body.

    Returns the index in `secrets` of the key that matched (0 is the current key), so the
    caller can count deliveries still signed with a previous key. Raises InvalidSignature
    for every failure, a malformed header included.
    """
    if header is None:
        raise InvalidSignature
    try:
        raw = header.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidSignature from None
    # Strict shape first: bytes.fromhex would also accept spaces.
    if _HEX_DIGEST.fullmatch(raw) is None:
        raise InvalidSignature
    given = bytes.fromhex(raw.decode("ascii"))
    matched = -1
    # Every key is tried, so the time taken does not tell which one (or none) matched.
    for index, secret in enumerate(secrets):
        expected = hmac.digest(secret, body, "sha256")
        if hmac.compare_digest(expected, given) and matched < 0:
            matched = index
    if matched < 0:
        raise InvalidSignature
    return matched
