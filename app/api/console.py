"""The console's reads, usable without it: /conversations, /stats/timeline, /rejections."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.exceptions import RequestValidationError

from app.api.deps import UNAVAILABLE, SettingsDep, StoreDep, json_response, unavailable
from app.api.params import CURSOR_PATTERN, Limit, optional
from app.models import INSTANT_PATTERN, check_instant, decode_position
from app.records import (
    BucketSize,
    ConversationPage,
    RangeError,
    RejectionPage,
    Timeline,
    dense_timeline,
    timeline_range,
)
from app.storage import StorageUnavailable

logger = logging.getLogger("app.api")

router = APIRouter(tags=["console"])

REJECTION_CURSOR_PATTERN = r"^[1-9][0-9]{0,17}$"


def check_conversation_cursor(value: str) -> str:
    if not decode_position(value)[2]:
        raise ValueError("is not a cursor this service issued")
    return value


@router.get(
    "/conversations",
    response_model=ConversationPage,
    summary="Senders, most recent first, with their last message",
    responses=UNAVAILABLE,
)
async def conversations(
    store: StoreDep,
    settings: SettingsDep,
    limit: Limit = 50,
    cursor: Annotated[
        str | None,
        Query(
            description="next_cursor from the previous page: keyset paging",
            json_schema_extra={"pattern": CURSOR_PATTERN},
        ),
        optional(check_conversation_cursor),
    ] = None,
) -> Response:
    after = None
    if cursor is not None:
        ts_key, message_id, _ = decode_position(cursor)
        after = (ts_key, message_id)
    try:
        page = await store.conversations(limit, after)
    except StorageUnavailable as exc:
        logger.warning("read failed", extra={"reason": str(exc)})
        return unavailable(settings)
    return json_response(page.model_dump_json().encode())


@router.get(
    "/stats/timeline",
    response_model=Timeline,
    summary="Messages per hour or day of ts (UTC)",
    description=(
        "Every bucket that overlaps [since, until), empty ones at 0: since is rounded down"
        " and until up to whole buckets. Defaults: until now, since 48 hours (hour) or 30"
        " days (day) before until. At most 8,784 hour or 3,660 day buckets."
    ),
    responses=UNAVAILABLE,
)
async def timeline(
    store: StoreDep,
    settings: SettingsDep,
    bucket: Annotated[BucketSize, Query()] = "day",
    since: Annotated[
        str | None,
        Query(
            description="From the bucket holding this instant (ISO-8601 UTC, like ts)",
            json_schema_extra={"pattern": INSTANT_PATTERN},
        ),
        optional(check_instant),
    ] = None,
    until: Annotated[
        str | None,
        Query(
            description="Up to this instant, exclusive (ISO-8601 UTC, like ts)",
            json_schema_extra={"pattern": INSTANT_PATTERN},
        ),
        optional(check_instant),
    ] = None,
) -> Response:
    try:
        span = timeline_range(bucket, since, until, datetime.now(UTC))
    except RangeError as exc:
        raise RequestValidationError(
            [{"loc": ["query", exc.param], "msg": str(exc), "type": "value_error"}]
        ) from None
    try:
        counts = await store.timeline(span)
    except StorageUnavailable as exc:
        logger.warning("read failed", extra={"reason": str(exc)})
        return unavailable(settings)
    return json_response(dense_timeline(span, counts))


@router.get(
    "/rejections",
    response_model=RejectionPage,
    summary="Refused deliveries, newest first",
    description=(
        "The newest REJECTIONS_KEPT refusals of /webhook and /webhook/whatsapp, and"
        " deliveries that reused a message_id with different content (`conflict`)."
        " Never a body, a header value or a secret."
    ),
    responses=UNAVAILABLE,
)
async def rejections(
    store: StoreDep,
    settings: SettingsDep,
    limit: Limit = 50,
    cursor: Annotated[
        str | None,
        Query(
            description="next_cursor from the previous page",
            pattern=REJECTION_CURSOR_PATTERN,
        ),
    ] = None,
) -> Response:
    before = None if cursor is None else int(cursor)
    try:
        page = await store.rejections(limit, before)
    except StorageUnavailable as exc:
        logger.warning("read failed", extra={"reason": str(exc)})
        return unavailable(settings)
    return json_response(page.model_dump_json().encode())
