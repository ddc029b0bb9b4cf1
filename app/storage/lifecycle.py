"""What the data lifecycle shares across backends: tombstone hashes, counts, export lines.

A tombstone is the first TOMBSTONE_BYTES of HMAC-SHA256(key, message_id), where the key
is random, made by migration 0004 and kept in the database (`lifecycle_key`): every
replica and a restored backup hash alike, and the table holds no message_id in clear
(docs/lifecycle.md weighs this against a key from the environment).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import to_json

from app.hashing import hmac_sha256
from app.models import (
    InvalidMessage,
    Message,
    StoredMessage,
    instant_key,
    public_errors,
    read_json,
)

# 128 bits: no two ids meet by chance in any table this service will hold.
TOMBSTONE_BYTES = 16
# Rows per page of an export read, and per transaction of an import (on SQLite, inserts
# of a running service wait for one import transaction: some 50-100 ms).
EXPORT_PAGE = 1000
IMPORT_BATCH = 2000
# Rows an erasure of a number deletes per transaction.
ERASE_BATCH = 500


def tombstone_hash(key: bytes, message_id: str) -> bytes:
    # Computed per row on the writer thread: see app/hashing.py for why not hmac.digest().
    return hmac_sha256(key, message_id.encode())[:TOMBSTONE_BYTES]


def number_digest(key: bytes, msisdn: str) -> str:
    """What an audit line shows of an erased number: a keyed hash, never the number."""
    return hmac_sha256(key, b"number:" + msisdn.encode())[:8].hex()


@dataclass(frozen=True, slots=True)
class Erasure:
    """What one erasure did; `target` is the keyed digest of what was erased."""

    target: str
    deleted: int
    tombstones: int


@dataclass(slots=True)
class ImportCounts:
    created: int = 0
    duplicate: int = 0
    tombstoned: int = 0

    def add(self, other: ImportCounts) -> None:
        self.created += other.created
        self.duplicate += other.duplicate
        self.tombstoned += other.tombstoned


# (message_id, from, to, ts, text, created_at): what an export reads, in order.
EXPORT_COLUMNS = "message_id, from_msisdn, to_msisdn, ts, text, created_at"
ImportRow = tuple[Message, str | None]


def stored_message(row: Sequence[Any]) -> StoredMessage:
    return StoredMessage.model_construct(
        message_id=row[0], from_=row[1], to=row[2], ts=row[3], text=row[4], received_at=row[5]
    )


def export_line(row: Sequence[Any]) -> bytes:
    """One NDJSON line: the /messages item fields and received_at."""
    return (
        to_json(
            {
                "message_id": row[0],
                "from": row[1],
                "to": row[2],
                "ts": row[3],
                "text": row[4],
                "received_at": row[5],
            }
        )
        + b"\n"
    )


def received_key(value: str) -> str:
    """A received_at in created_at's fixed form (microseconds, Z), from any valid instant."""
    key = instant_key(value)  # nine fractional digits
    return key[:26] + "Z"


def parse_import_line(raw: bytes) -> ImportRow:
    """A line of an export, checked by /webhook's rules; InvalidMessage says what is wrong.

    received_at is optional (absent: the time of the import); any other field but the
    message's is ignored, as /webhook ignores them.
    """
    data = read_json(raw)
    try:
        message = Message.model_validate(data)
    except ValidationError as exc:
        raise InvalidMessage(public_errors(exc, prefix="line")) from None
    received = data.get("received_at") if isinstance(data, dict) else None
    if received is None:
        return message, None
    problem = None
    if not isinstance(received, str):
        problem = "must be a string"
    else:
        try:
            return message, received_key(received)
        except ValueError as exc:
            problem = str(exc)
    raise InvalidMessage([{"loc": ["line", "received_at"], "msg": problem, "type": "value_error"}])


def describe_invalid(exc: InvalidMessage) -> str:
    """`field: problem; ...` for a person reading an import's error."""
    parts = []
    for error in exc.errors:
        loc = [str(part) for part in error["loc"] if part not in ("line", "body")]
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{'.'.join(loc) or 'line'}: {message}")
    return "; ".join(parts)
