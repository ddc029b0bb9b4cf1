"""Rows as every backend stores and reads them: one shape, one clock, one page builder."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from app.models import (
    ListQuery,
    Message,
    MessagePage,
    StoredMessage,
    encode_cursor,
    instant_key_unchecked,
)
from app.records import Conversation, ConversationPage, Rejection, RejectionPage

# (message_id, from, to, ts, text, ts_key, text_folded): what an insert binds, in order.
Row = tuple[Any, ...]


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


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
    """A page from up to limit+1 rows of (id, from, to, ts, text, ts_key, created_at)."""
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    data = [
        StoredMessage.model_construct(
            message_id=r[0], from_=r[1], to=r[2], ts=r[3], text=r[4], received_at=r[6]
        )
        for r in rows
    ]
    next_cursor = encode_cursor(rows[-1][5], rows[-1][0], query.descending) if more else None
    return MessagePage(
        data=data, total=total, limit=query.limit, offset=query.offset, next_cursor=next_cursor
    )


def build_conversations(rows: Sequence[Row], limit: int) -> ConversationPage:
    """A page from up to limit+1 rows of
    (from, count, last ts_key, last message_id, to, ts, text, first ts)."""
    more = len(rows) > limit
    rows = rows[:limit]
    data = [
        Conversation(
            from_=r[0],
            count=r[1],
            first_ts=r[7],
            last_ts=r[5],
            last_message=Message.model_construct(
                message_id=r[3], from_=r[0], to=r[4], ts=r[5], text=r[6]
            ),
        )
        for r in rows
    ]
    next_cursor = encode_cursor(rows[-1][2], rows[-1][3], descending=True) if more else None
    return ConversationPage(data=data, limit=limit, next_cursor=next_cursor)


REJECTION_COLUMNS = "id, at, endpoint, reason, field, remote, body_bytes, message_id, request_id"


def build_rejections(rows: Sequence[Row], limit: int) -> RejectionPage:
    """A page from up to limit+1 rows of REJECTION_COLUMNS, newest first."""
    more = len(rows) > limit
    rows = rows[:limit]
    names = REJECTION_COLUMNS.split(", ")
    data = [Rejection.model_validate(dict(zip(names, r, strict=True))) for r in rows]
    return RejectionPage(data=data, limit=limit, next_cursor=str(rows[-1][0]) if more else None)
