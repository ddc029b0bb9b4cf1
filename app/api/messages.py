"""GET /messages and GET /stats: the stored messages, listed, searched and counted."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError

from app.api.deps import UNAVAILABLE, StoreDep, answer_read
from app.api.params import (
    CURSOR_PATTERN,
    Limit,
    Recipient,
    Search,
    Sender,
    Since,
    Until,
    optional,
)
from app.models import (
    ListQuery,
    MessagePage,
    Stats,
    decode_position,
    instant_key,
)

router = APIRouter()

OFFSET_MAX = 1_000_000_000


def check_cursor(value: str) -> str:
    decode_position(value)
    return value


def wrong_order(cursor_descending: bool) -> dict[str, Any]:
    issued = "desc" if cursor_descending else "asc"
    return {
        "loc": ["query", "cursor"],
        "msg": f"was issued for order={issued}; pass the same order to continue",
        "type": "value_error",
    }


# The routes return bytes serialised once by Pydantic (a Response, so FastAPI does not
# validate and serialise the model a second time); response_model is there for the
# OpenAPI document alone.
@router.get(
    "/messages", response_model=MessagePage, summary="List stored messages", responses=UNAVAILABLE
)
async def list_messages(
    request: Request,
    store: StoreDep,
    limit: Limit = 50,
    offset: Annotated[int, Query(ge=0, le=OFFSET_MAX)] = 0,
    sender: Sender = None,
    recipient: Recipient = None,
    since: Since = None,
    until: Until = None,
    order: Annotated[
        Literal["asc", "desc"],
        Query(description="asc: oldest first (the default); desc: newest first"),
    ] = "asc",
    q: Search = None,
    cursor: Annotated[
        str | None,
        Query(
            description="next_cursor from the previous page (with the same order): keyset paging",
            json_schema_extra={"pattern": CURSOR_PATTERN},
        ),
        optional(check_cursor),
    ] = None,
) -> Response:
    descending = order == "desc"
    after = None
    if cursor is not None:
        *after_position, cursor_descending = decode_position(cursor)
        if cursor_descending != descending:
            raise RequestValidationError([wrong_order(cursor_descending)])
        after = (after_position[0], after_position[1])
    query = ListQuery(
        limit=limit,
        offset=offset,
        sender=sender,
        recipient=recipient,
        since_key=None if since is None else instant_key(since),
        until_key=None if until is None else instant_key(until),
        q=q or None,
        descending=descending,
        after=after,
    )
    return await answer_read(
        request, store.list_messages(query), lambda page: page.model_dump_json().encode()
    )


@router.get("/stats", response_model=Stats, summary="Message counts", responses=UNAVAILABLE)
async def stats(request: Request, store: StoreDep) -> Response:
    return await answer_read(
        request, store.stats(), lambda result: result.model_dump_json(by_alias=True).encode()
    )
