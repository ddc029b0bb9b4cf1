"""HMAC-SHA256 that keeps the GIL, for the threads of a busy process.

`hmac.digest()` (one call into OpenSSL) lets go of the GIL for every digest, however
short the message, and must win it back afterwards. Beside a thread that keeps it busy,
the event loop under load, winning it back waits for the switch interval (5 ms): 200
digests took 880 ms instead of under 1 ms. The writer thread computed a tombstone hash
per row that way, and its groups crawled; the event loop verified signatures that way.
An `hmac.new()` object digests a message under 2 KB without letting go (hashlib's
threshold), for the same 1.6 us.
"""

from __future__ import annotations

import hashlib
import hmac


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()
