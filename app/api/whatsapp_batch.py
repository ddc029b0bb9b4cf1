"""WhatsApp Cloud API batches, read into our messages: pure, no HTTP here.

Meta posts batches: a list of entries, each with a list of changes, each change's value
carrying messages and/or status updates. Every message becomes one of our messages (its
`wamid` is the `message_id`); a malformed one is set aside with where it was and why.
A batch is read SLICE items at a time (see `read_batch`), so that the caller can let
other work run in between.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from app.models import InvalidMessage, Message, read_json

# Unix seconds up to year 5138: generous, and small enough for any datetime.
_UNIX_SECONDS = re.compile(r"[0-9]{1,11}")
# Where Meta keeps what becomes each of our fields, for messages that say what is wrong.
_META_FIELDS = {
    "message_id": "id",
    "from": "from",
    "to": "metadata.display_phone_number",
    "ts": "timestamp",
    "text": "text.body",
}
# Messages (and entries, changes, statuses) handled between two turns of the event loop:
# validating one costs 5-20 us, so a slice takes a few ms (and a 3 MB batch ~150 turns).
SLICE = 200


class InvalidPart(ValueError):
    """One message, or one part of a batch, cannot be read. Names fields, never values."""


@dataclass
class Batch:
    """What one delivery holds: the messages to store, what was skipped, the statuses."""

    messages: list[Message] = field(default_factory=list)
    # (where in the batch, why), e.g. ("entry[0].changes[1].value.messages[2]", "from: ...")
    invalid: list[tuple[str, str]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    ignored_changes: int = 0
    # Items read so far: a slice ends every SLICE of them.
    read: int = 0

    def slice_done(self) -> bool:
        self.read += 1
        return self.read % SLICE == 0


def parse_batch(body: bytes) -> Batch:
    """Read a verified body; raise InvalidMessage only if it is not a batch at all."""
    batch = Batch()
    for _ in read_batch(read_json(body), batch):
        pass
    return batch


async def parse_batch_in_slices(body: bytes) -> Batch:
    """parse_batch, letting the event loop run other requests after every slice."""
    # Decoding is one step (about 30 ms for 3 MB, docs/limits.md); the rest is sliced.
    payload = read_json(body)
    await asyncio.sleep(0)
    batch = Batch()
    for _ in read_batch(payload, batch):
        await asyncio.sleep(0)
    return batch


def read_batch(payload: object, batch: Batch) -> Iterator[None]:
    """Fill `batch` from a decoded body, yielding after every slice of SLICE items."""
    if not isinstance(payload, dict):
        raise InvalidMessage([{"loc": ["body"], "msg": "must be an object", "type": "dict_type"}])
    entries = payload.get("entry")
    if not isinstance(entries, list):
        raise InvalidMessage(
            [{"loc": ["body", "entry"], "msg": "must be a list of entries", "type": "list_type"}]
        )
    for e, entry in enumerate(entries):
        where = f"entry[{e}]"
        if batch.slice_done():
            yield
        changes = entry.get("changes") if isinstance(entry, dict) else None
        if not isinstance(changes, list):
            batch.invalid.append((where, "must be an object with a list of changes"))
            continue
        for c, change in enumerate(changes):
            here = f"{where}.changes[{c}]"
            if batch.slice_done():
                yield
            value = change.get("value") if isinstance(change, dict) else None
            if not isinstance(value, dict):
                batch.invalid.append((here, "must be an object with an object value"))
            elif change.get("field") != "messages":
                # Other subscriptions (templates, account updates) carry no messages.
                batch.ignored_changes += 1
            else:
                yield from read_value(value, f"{here}.value", batch)


def read_value(value: dict[str, Any], where: str, batch: Batch) -> Iterator[None]:
    """The messages and statuses of one change's value, into `batch`, slice by slice."""
    messages = value.get("messages", [])
    statuses = value.get("statuses", [])
    if not isinstance(messages, list):
        batch.invalid.append((f"{where}.messages", "must be a list"))
        messages = []
    if not isinstance(statuses, list):
        batch.invalid.append((f"{where}.statuses", "must be a list"))
        statuses = []
    to = business_number(value.get("metadata"))
    for m, item in enumerate(messages):
        try:
            batch.messages.append(to_message(item, to))
        except InvalidPart as exc:
            batch.invalid.append((f"{where}.messages[{m}]", str(exc)))
        if batch.slice_done():
            yield
    for status in statuses:
        state = status.get("status") if isinstance(status, dict) else None
        batch.statuses.append(state if isinstance(state, str) else "other")
        if batch.slice_done():
            yield


def business_number(metadata: object) -> str | None:
    """`+` and the display number the messages were sent to, if the metadata has one."""
    if not isinstance(metadata, dict):
        return None
    number = metadata.get("display_phone_number")
    if not isinstance(number, str):
        return None
    # Meta sends bare digits; a leading '+' is tolerated, not doubled.
    return "+" + number.removeprefix("+")


def to_message(item: object, to: str | None) -> Message:
    """One of Meta's messages as ours; raises InvalidPart naming what is wrong."""
    if not isinstance(item, dict):
        raise InvalidPart("must be an object")
    if to is None:
        raise InvalidPart("metadata.display_phone_number: missing")
    sender = item.get("from")
    if not isinstance(sender, str):
        raise InvalidPart("from: must be a string")
    kind = item.get("type")
    if not isinstance(kind, str):
        raise InvalidPart("type: must be a string")
    text = None
    if kind == "text":
        body = item.get("text")
        text = body.get("body") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise InvalidPart("text.body: must be a string in a text message")
    fields = {
        "message_id": item.get("id"),
        "from": "+" + sender,
        "to": to,
        "ts": unix_to_instant(item.get("timestamp")),
        "text": text,
    }
    try:
        return Message.model_validate(fields)
    except ValidationError as exc:
        problems = [
            f"{_META_FIELDS.get(str(error['loc'][0]), error['loc'][0])}: {error['msg']}"
            if error["loc"]
            else error["msg"]
            for error in exc.errors(include_input=False, include_url=False, include_context=False)
        ]
        raise InvalidPart("; ".join(problems)) from None


def unix_to_instant(value: object) -> str:
    """Meta's Unix-seconds timestamp (a string of digits) as `YYYY-MM-DDTHH:MM:SSZ`."""
    if isinstance(value, str) and _UNIX_SECONDS.fullmatch(value):
        seconds = int(value)
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**11:
        seconds = value
    else:
        raise InvalidPart("timestamp: must be Unix seconds")
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
