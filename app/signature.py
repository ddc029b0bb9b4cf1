"""Signature verification, for every scheme a sender may use. Pure functions; no HTTP here.

- `X-Signature`: the hex HMAC-SHA256 of the raw body, optionally prefixed `sha256=`.
- `X-Hub-Signature-256` (Meta, GitHub): `sha256=` and the hex HMAC-SHA256 of the raw body.
- Standard Webhooks v1: the base64 HMAC-SHA256 of `id.timestamp.body`, one or more
  signatures separated by spaces, the timestamp within a window around `now`.

Every failure raises InvalidSignature. Its `reason` is for tests and operators; the
client gets the same 401 whatever went wrong, so probing teaches it nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from app.hashing import hmac_sha256

# The reasons, a closed set.
MISSING = "missing"
MALFORMED = "malformed"
MISMATCH = "mismatch"
EXPIRED = "expired"
FUTURE = "future"

_HEX_SIGNATURE = re.compile(rb"(?:sha256=)?([0-9a-fA-F]{64})")
_HUB_SIGNATURE = re.compile(rb"sha256=([0-9a-fA-F]{64})")
# Visible ASCII without '.': the dot separates the signed parts, so an id holding one
# could shift bytes between the id and the timestamp under the same signature.
_WEBHOOK_ID = re.compile(rb"[\x21-\x2d\x2f-\x7e]{1,256}")
# Unix seconds, canonical: no sign, no leading zero, no fraction, no spaces.
_TIMESTAMP = re.compile(rb"0|[1-9][0-9]{0,11}")
_VERSION = re.compile(rb"v[0-9]+[a-z]*")
_V1_SIGNATURE = re.compile(rb"[A-Za-z0-9+/]{43}=")
_OPAQUE = re.compile(rb"[\x21-\x7e]+")

# A sender signs once per key it holds (two or three during a rotation); 16 is generous.
MAX_SIGNATURE_ENTRIES = 16

X_SIGNATURE = b"x-signature"
WEBHOOK_ID = b"webhook-id"
WEBHOOK_TIMESTAMP = b"webhook-timestamp"
WEBHOOK_SIGNATURE = b"webhook-signature"
_SIGNATURE_HEADERS = frozenset({X_SIGNATURE, WEBHOOK_ID, WEBHOOK_TIMESTAMP, WEBHOOK_SIGNATURE})

# A header value as ASGI gives it (bytes), as a test may (str), or absent.
HeaderValue = str | bytes | None


class InvalidSignature(Exception):
    """The signature is missing, malformed, stale or wrong. The client is told no more."""

    def __init__(self, reason: str = MISMATCH) -> None:
        super().__init__(reason)
        self.reason = reason


def sign(body: bytes, secret: bytes) -> str:
    """The lower-case hex HMAC-SHA256 of `body`: what a sender puts in X-Signature."""
    return hmac_sha256(secret, body).hex()


def sign_standard_webhook(webhook_id: str, timestamp: int, body: bytes, key: bytes) -> str:
    """A `webhook-signature` entry, `v1,<base64>`, for one key."""
    digest = _standard_digest(key, webhook_id.encode("ascii"), str(timestamp).encode(), body)
    return "v1," + base64.b64encode(digest).decode("ascii")


def verify_signature(body: bytes, header: HeaderValue, secrets: Sequence[bytes]) -> int:
    """Check an X-Signature header (hex, optionally `sha256=` first) against the raw body.

    Returns the index in `secrets` of the key that matched (0 is the current key), so the
    caller can count deliveries still signed with a previous key.
    """
    match = _HEX_SIGNATURE.fullmatch(_ascii(header))
    if match is None:
        raise InvalidSignature(MALFORMED)
    return _matching_key([bytes.fromhex(match[1].decode("ascii"))], secrets, body)


def verify_hub_signature(body: bytes, header: HeaderValue, secrets: Sequence[bytes]) -> int:
    """Check an X-Hub-Signature-256 header (`sha256=<hex>`, as Meta sends it)."""
    match = _HUB_SIGNATURE.fullmatch(_ascii(header))
    if match is None:
        raise InvalidSignature(MALFORMED)
    return _matching_key([bytes.fromhex(match[1].decode("ascii"))], secrets, body)


def verify_standard_webhook(
    body: bytes,
    webhook_id: HeaderValue,
    timestamp: HeaderValue,
    signature: HeaderValue,
    keys: Sequence[bytes],
    *,
    now: float,
    max_age: float = 300,
    max_ahead: float = 300,
) -> int:
    """Check Standard Webhooks v1 headers against the raw body; the index of the key.

    Entries of other versions (`v1a`, asymmetric) are skipped, but must be well formed;
    a header without any `v1` entry cannot verify, and one with more than
    MAX_SIGNATURE_ENTRIES entries is malformed. `max_age` and `max_ahead` bound how far
    the timestamp may be behind or ahead of `now`, in seconds; that is checked first.
    """
    raw_id, raw_ts, raw_sig = _ascii(webhook_id), _ascii(timestamp), _ascii(signature)
    if _WEBHOOK_ID.fullmatch(raw_id) is None or _TIMESTAMP.fullmatch(raw_ts) is None:
        raise InvalidSignature(MALFORMED)
    sent_at = int(raw_ts)
    # The window before the signatures are even read: a replayed or stale delivery costs
    # a comparison, not a parse and a digest per key.
    if sent_at < now - max_age:
        raise InvalidSignature(EXPIRED)
    if sent_at > now + max_ahead:
        raise InvalidSignature(FUTURE)
    # Bounded before parsing: each entry costs a decode and a comparison per key, and a
    # header of thousands of them made one request cost milliseconds of CPU.
    if raw_sig.count(b" ") >= MAX_SIGNATURE_ENTRIES:
        raise InvalidSignature(MALFORMED)
    given = _v1_signatures(raw_sig)
    if not given:
        raise InvalidSignature(MISMATCH)
    return _first_match((_standard_digest(key, raw_id, raw_ts, body) for key in keys), given)


@dataclass(frozen=True, slots=True)
class Verifier:
    """The keys and window one receiver accepts; `verify` picks the scheme from the headers.

    `secrets` key X-Signature as given; `standard_keys` are the same secrets as Standard
    Webhooks senders use them (a `whsec_` secret decoded), in the same order.
    """

    secrets: tuple[bytes, ...]
    standard_keys: tuple[bytes, ...]
    max_age: float = 300
    max_ahead: float = 300

    def verify(self, body: bytes, headers: Iterable[tuple[bytes, bytes]], now: float) -> int:
        """The index of the key that verified `body` (0: current). `headers` as in ASGI.

        Any `webhook-*` header selects Standard Webhooks (and then all three are
        required); otherwise X-Signature. A signature header sent twice is malformed.
        """
        found: dict[bytes, bytes] = {}
        for name, value in headers:
            if name in _SIGNATURE_HEADERS:
                if name in found:
                    raise InvalidSignature(MALFORMED)
                found[name] = value
        x_signature = found.get(X_SIGNATURE)
        if len(found) == (x_signature is not None):  # no webhook-* header at all
            return verify_signature(body, x_signature, self.secrets)
        return verify_standard_webhook(
            body,
            found.get(WEBHOOK_ID),
            found.get(WEBHOOK_TIMESTAMP),
            found.get(WEBHOOK_SIGNATURE),
            self.standard_keys,
            now=now,
            max_age=self.max_age,
            max_ahead=self.max_ahead,
        )


def _ascii(header: HeaderValue) -> bytes:
    if header is None:
        raise InvalidSignature(MISSING)
    if isinstance(header, bytes):
        return header
    try:
        return header.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidSignature(MALFORMED) from None


def _matching_key(given: Sequence[bytes], secrets: Sequence[bytes], body: bytes) -> int:
    return _first_match((hmac_sha256(secret, body) for secret in secrets), given)


def _first_match(expected: Iterable[bytes], given: Sequence[bytes]) -> int:
    """The index of the first expected digest among `given`, else InvalidSignature.

    Every pair is compared, with compare_digest, so the time taken does not tell which
    key (or none) matched.
    """
    matched = -1
    for index, digest in enumerate(expected):
        for candidate in given:
            if hmac.compare_digest(digest, candidate) and matched < 0:
                matched = index
    if matched < 0:
        raise InvalidSignature(MISMATCH)
    return matched


def _standard_digest(key: bytes, webhook_id: bytes, timestamp: bytes, body: bytes) -> bytes:
    # The prefix, then the body: no copy of a large body just to prepend a few bytes.
    mac = hmac.new(key, webhook_id + b"." + timestamp + b".", hashlib.sha256)
    mac.update(body)
    return mac.digest()


def _v1_signatures(header: bytes) -> list[bytes]:
    """The decoded `v1` digests of a `webhook-signature` header; strict about the shape."""
    digests = []
    # One space between entries, none around them: split() would accept any whitespace.
    for entry in header.split(b" "):
        version, comma, value = entry.partition(b",")
        if not comma or _VERSION.fullmatch(version) is None or _OPAQUE.fullmatch(value) is None:
            raise InvalidSignature(MALFORMED)
        if version != b"v1":
            continue
        if _V1_SIGNATURE.fullmatch(value) is None:
            raise InvalidSignature(MALFORMED)
        digest = base64.b64decode(value)
        # Canonical only: the last digit must not carry bits that decoding drops.
        if base64.b64encode(digest) != value:
            raise InvalidSignature(MALFORMED)
        digests.append(digest)
    return digests


class StreamingHubVerifier:
    """X-Hub-Signature-256 checked while the body streams in: `update` each chunk, then
    `verify`. The header is parsed first, so a missing or malformed one is refused before
    any of the body is read; the body never has to be whole to be verified.
    """

    __slots__ = ("_given", "_macs")

    def __init__(self, header: HeaderValue, secrets: Sequence[bytes]) -> None:
        match = _HUB_SIGNATURE.fullmatch(_ascii(header))
        if match is None:
            raise InvalidSignature(MALFORMED)
        self._given = [bytes.fromhex(match[1].decode("ascii"))]
        self._macs = [hmac.new(secret, digestmod=hashlib.sha256) for secret in secrets]

    def update(self, chunk: bytes) -> None:
        for mac in self._macs:
            mac.update(chunk)

    def verify(self) -> int:
        """The index of the secret that signed the body so far, else InvalidSignature."""
        return _first_match((mac.digest() for mac in self._macs), self._given)
