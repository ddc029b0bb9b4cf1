"""Rows as every backend stores and reads them: one shape, one clock, one page builder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from app.models import ListQuery, Message, MessagePage, encode_cursor, instant_key_unchecked

# (message_id, from, to, ts, text, ts_key, text_folded): what an insert binds, in order.
Row = tuple[Any, ...]


# What a store reads the time from: the system clock, or a test's (retention, tombstones).
Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


def format_instant(moment: datetime) -> str:
    """`created_at`'s form: fixed width (microseconds, Z), so text order is time order."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def utc_now() -> str:
    return format_instant(system_clock())


def message_row(message: Message) -> Row:
    text = message.text
    return (
        message.message_id,
        message.from_,
        message.to,
        message.ts,
        text,
        instant_key_unchecked(message.ts),
        None if text is None else text.casefold(),
    )


def build_page(rows: Sequence[Row], total: int, query: ListQuery) -> MessagePage:
    """A page from up to limit+1 rows of (id, from, to, ts, text, ts_key)."""
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    data = [
        Message.model_construct(message_id=r[0], from_=r[1], to=r[2], ts=r[3], text=r[4])
        for r in rows
    ]
    next_cursor = encode_cursor(rows[-1][5], rows[-1][0]) if more else None
    return MessagePage(
        data=data, total=total, limit=query.limit, offset=query.offset, next_cursor=next_cursor
    )
