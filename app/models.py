"""The records: what a sender posts, what the store returns, and the rules they obey."""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import from_json

# `[0-9]`, not `\d`: `\d` also matches other scripts' digits. fullmatch, so no `$`
# that would let a trailing newline through.
E164 = re.compile(r"\+[1-9][0-9]{1,14}")
ISO_UTC = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?Z"
)
INSTANT_KEY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{9}Z")
CURSOR = re.compile(r"[A-Za-z0-9_-]{1,1024}")
MESSAGE_ID_MAX = 256
# The third element of a newest-first cursor's position.
DESCENDING = "desc"
TEXT_MAX = 4096

# The same rules as JSON Schema patterns, for the OpenAPI document only (validation is the
# code below). The instant pattern knows the calendar, so that a generated example that
# fits the document is also a real instant.
E164_PATTERN = r"^\+[1-9][0-9]{1,14}$"
_YEAR = "(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_LEAP_YEAR = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = (
    "(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
    "|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    "|02-(?:0[1-9]|1[0-9]|2[0-8]))"
)
INSTANT_PATTERN = (
    f"^(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
    r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?Z$"
)
NO_NUL_PATTERN = r"^[^\u0000]*$"


def check_msisdn(value: str) -> str:
    if E164.fullmatch(value) is None:
        raise ValueError("must be E.164: '+' then 2 to 15 digits, the first not 0")
    return value


def instant_key(value: str) -> str:
    """A fixed-width form of a valid `ts` whose string order is its order in time.

    `2025-01-15T10:00:00.5Z` becomes `2025-01-15T10:00:00.500000000Z`: nine fractional
    digits for everyone, so fractional seconds compare correctly as text.
    """
    match = ISO_UTC.fullmatch(value)
    if match is None:
        raise ValueError("must be an ISO-8601 UTC instant: YYYY-MM-DDTHH:MM:SS[.fraction]Z")
    year, month, day, hour, minute, second, fraction = match.groups()
    try:
        datetime(int(year), int(month), int(day), int(hour), int(minute), int(second))
    except ValueError:
        raise ValueError("is not a real calendar instant") from None
    return f"{value[:19]}.{(fraction or '').ljust(9, '0')}Z"


def instant_key_unchecked(value: str) -> str:
    """instant_key() of a `ts` that has already passed validation: no second check.

    The insert path calls this for every row, after Message validated `ts`; anything else
    must call instant_key().
    """
    fraction = value[20:-1]  # "" without a fraction
    return f"{value[:19]}.{fraction.ljust(9, '0')}Z"


def check_instant(value: str) -> str:
    instant_key(value)
    return value


def no_nul(value: str) -> str:
    # PostgreSQL cannot store (or compare) NUL in text: refuse it here, on every backend
    # alike, in bodies and in query parameters.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


MSISDN = Annotated[
    str, AfterValidator(check_msisdn), Field(json_schema_extra={"pattern": E164_PATTERN})
]
Instant = Annotated[
    str, AfterValidator(check_instant), Field(json_schema_extra={"pattern": INSTANT_PATTERN})
]
NO_NUL = {"pattern": NO_NUL_PATTERN}


class Message(BaseModel):
    """One WhatsApp-style message, as posted to /webhook and as listed by /messages."""

    model_config = ConfigDict(
        strict=True, extra="ignore", frozen=True, populate_by_name=True, serialize_by_alias=True
    )

    message_id: Annotated[
        str,
        Field(min_length=1, max_length=MESSAGE_ID_MAX, json_schema_extra=NO_NUL),
        AfterValidator(no_nul),
    ]
    from_: Annotated[MSISDN, Field(alias="from")]
    to: MSISDN
    ts: Instant
    text: (
        Annotated[
            str,
            Field(max_length=TEXT_MAX, json_schema_extra=NO_NUL),
            AfterValidator(no_nul),
        ]
        | None
    ) = None


class StoredMessage(Message):
    """A message as the store lists it: what was posted, plus when the service committed it."""

    received_at: str = Field(
        description="When the service committed the message (UTC, in the form of `ts`)"
    )


class MessagePage(BaseModel):
    model_config = ConfigDict(serialize_by_alias=True)

    data: list[StoredMessage]
    total: int
    limit: int
    offset: int
    next_cursor: str | None = Field(
        default=None,
        description="Pass as `cursor` to read the next page by keyset; null on the last page.",
    )


class SenderCount(BaseModel):
    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    from_: str = Field(alias="from")
    count: int


class Stats(BaseModel):
    total_messages: int
    senders_count: int
    messages_per_sender: list[SenderCount]
    first_message_ts: str | None
    last_message_ts: str | None


class ListQuery(BaseModel):
    """A validated /messages query; `since` and `after` are already instant keys."""

    model_config = ConfigDict(frozen=True)

    limit: int = 50
    offset: int = 0
    sender: str | None = None
    recipient: str | None = None
    since_key: str | None = None
    # Exclusive: rows with ts_key < until_key.
    until_key: str | None = None
    q: str | None = None
    # Newest first (ts_key, then message_id, both descending) instead of the contract's order.
    descending: bool = False
    # Keyset position (instant key, message_id): rows strictly after it in the listing
    # order (so, when descending, strictly before it in time).
    after: tuple[str, str] | None = None


FEED_LIMIT_MAX = 1000


class FeedItem(BaseModel):
    """One message in the feed, at its position (see docs/feed.md)."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    position: int = Field(description="Strictly increasing in feed order, never reused")
    message_id: str
    from_: str = Field(alias="from")
    to: str
    ts: str
    text: str | None
    received_at: str = Field(description="When the service committed the message (UTC)")


class FeedPage(BaseModel):
    data: list[FeedItem]
    next_after: int = Field(
        description="The last position in `data` (or `after` when it is empty): pass it as"
        " `after` to read on"
    )


class FeedQuery(BaseModel):
    """A validated feed read: messages with position > after, in position order."""

    model_config = ConfigDict(frozen=True)

    after: int = 0
    limit: int = 100
    sender: str | None = None


class InvalidMessage(ValueError):
    """The body is not a valid message; `errors` is FastAPI-style and never echoes input."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} validation error(s)")
        self.errors = errors

    def to_json(self) -> bytes:
        return json.dumps(
            {"detail": self.errors}, ensure_ascii=False, separators=(",", ":")
        ).encode()

    def first_field(self) -> str:
        """Where the first problem is, for logs: `from`, `text`, or `body` for the whole."""
        loc = [str(part) for part in self.errors[0]["loc"]] if self.errors else []
        inner = loc[1:] if loc[:1] == ["body"] else loc
        return ".".join(inner) or "body"


def read_json(body: bytes) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity, no trailing data, bounded nesting."""
    try:
        return from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidMessage(
            [{"loc": ["body"], "msg": f"Invalid JSON: {exc}", "type": "json_invalid"}]
        ) from None


def parse_message(body: bytes) -> Message:
    """Parse and validate a webhook body (bytes that were already authenticated)."""
    data = read_json(body)
    try:
        return Message.model_validate(data)
    except ValidationError as exc:
        raise InvalidMessage(public_errors(exc, prefix="body")) from None


def public_errors(exc: ValidationError, prefix: str) -> list[dict[str, Any]]:
    """Pydantic errors without the input, its context or documentation links."""
    return [
        {"loc": [prefix, *error["loc"]], "msg": error["msg"], "type": error["type"]}
        for error in exc.errors(include_input=False, include_url=False, include_context=False)
    ]


def encode_cursor(ts_key: str, message_id: str, descending: bool = False) -> str:
    """An opaque keyset position: the (instant, message_id) of the last row served.

    A newest-first position says so, so that it cannot continue a page in the other order.
    """
    position = [ts_key, message_id, DESCENDING] if descending else [ts_key, message_id]
    raw = json.dumps(position, ensure_ascii=False, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> tuple[str, str]:
    """The (instant, message_id) of a cursor of either order."""
    ts_key, message_id, _ = decode_position(cursor)
    return ts_key, message_id


def decode_position(cursor: str) -> tuple[str, str, bool]:
    """(instant, message_id, descending) of a cursor this service issued."""
    error = ValueError("is not a cursor this service issued")
    if CURSOR.fullmatch(cursor) is None:
        raise error
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        position = json.loads(raw.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise error from None
    if (
        not isinstance(position, list)
        or len(position) not in (2, 3)
        or not all(isinstance(part, str) for part in position)
        or INSTANT_KEY.fullmatch(position[0]) is None
        or not 0 < len(position[1]) <= MESSAGE_ID_MAX
        or position[2:] not in ([], [DESCENDING])
    ):
        raise error
    return position[0], position[1], len(position) == 3
