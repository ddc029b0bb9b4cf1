"""GET /messages and GET /stats: the stored messages, listed, searched and counted."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import AfterValidator, BeforeValidator

from app.api.deps import UNAVAILABLE, StoreDep, answer_read
from app.models import (
    INSTANT_PATTERN,
    NO_NUL_PATTERN,
    ListQuery,
    MessagePage,
    Stats,
    check_instant,
    check_msisdn,
    decode_position,
    instant_key,
    no_nul,
)

router = APIRouter()

Q_MAX = 256
OFFSET_MAX = 1_000_000_000
# For the OpenAPI document: what a query parameter must look like (the validators decide).
SENDER_PATTERN = r"^[ +][1-9][0-9]{1,14}$"
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,1024}$"


def plus_for_space(value: object) -> object:
    # ?from=+91... unencoded arrives as " 91...": the '+' became a space.
    if isinstance(value, str) and value.startswith(" "):
        return "+" + value[1:]
    return value


def optional(check: Any) -> AfterValidator:
    return AfterValidator(lambda value: value if value is None else check(value))


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
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
    offset: Annotated[int, Query(ge=0, le=OFFSET_MAX)] = 0,
    sender: Annotated[
        str | None,
        Query(
            alias="from",
            description="Exact sender, E.164 (a leading space reads as '+')",
            json_schema_extra={"pattern": SENDER_PATTERN},
        ),
        BeforeValidator(plus_for_space),
        optional(check_msisdn),
    ] = None,
    recipient: Annotated[
        str | None,
        Query(
            alias="to",
            description="Exact recipient, E.164 (a leading space reads as '+')",
            json_schema_extra={"pattern": SENDER_PATTERN},
        ),
        BeforeValidator(plus_for_space),
        optional(check_msisdn),
    ] = None,
    since: Annotated[
        str | None,
        Query(
            description="Only messages with ts >= since (ISO-8601 UTC, like ts)",
            json_schema_extra={"pattern": INSTANT_PATTERN},
        ),
        optional(check_instant),
    ] = None,
    until: Annotated[
        str | None,
        Query(
            description="Only messages with ts < until (exclusive; ISO-8601 UTC, like ts)",
            json_schema_extra={"pattern": INSTANT_PATTERN},
        ),
        optional(check_instant),
    ] = None,
    order: Annotated[
        Literal["asc", "desc"],
        Query(description="asc: oldest first (the default); desc: newest first"),
    ] = "asc",
    q: Annotated[
        str | None,
        Query(
            max_length=Q_MAX,
            description="Case-insensitive substring of text",
            json_schema_extra={"pattern": NO_NUL_PATTERN},
        ),
        optional(no_nul),
    ] = None,
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
