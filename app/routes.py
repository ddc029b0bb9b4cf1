"""The read side of the API: /messages, /stats, probes and /metrics (FastAPI routes)."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any, TypedDict

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import AfterValidator, BeforeValidator

from app.config import Settings
from app.metrics import Metrics
from app.models import (
    INSTANT_PATTERN,
    NO_NUL_PATTERN,
    ListQuery,
    MessagePage,
    Stats,
    check_instant,
    check_msisdn,
    decode_cursor,
    instant_key,
)
from app.storage import MessageStore, StorageUnavailable

logger = logging.getLogger("app.api")

router = APIRouter()

READY_TIMEOUT_SECONDS = 1.0
Q_MAX = 256
OFFSET_MAX = 1_000_000_000
# For the OpenAPI document: what a query parameter must look like (the validators decide).
SENDER_PATTERN = r"^[ +][1-9][0-9]{1,14}$"
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,1024}$"
JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "The database cannot answer now; retry after Retry-After",
        "content": JSON_OBJECT,
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    }
}


# The dependencies are coroutines on purpose: FastAPI runs a plain `def` dependency in a
# worker thread, which would cost a thread hop per request for a dictionary lookup.


class AppState(TypedDict):
    """What the lifespan yields; FastAPI hands a copy to every request as request.state."""

    settings: Settings
    store: MessageStore
    metrics: Metrics


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


async def get_store(request: Request) -> MessageStore:
    store: MessageStore = request.state.store
    return store


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.state.metrics
    return metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[MessageStore, Depends(get_store)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def json_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        content=body, status_code=status, media_type="application/json", headers=headers
    )


def unavailable(settings: Settings) -> Response:
    return json_response(
        b'{"detail":"storage unavailable, retry later"}',
        503,
        headers={"retry-after": str(settings.retry_after_seconds)},
    )


def plus_for_space(value: object) -> object:
    # ?from=+91... unencoded arrives as " 91...": the '+' became a space.
    if isinstance(value, str) and value.startswith(" "):
        return "+" + value[1:]
    return value


def optional(check: Any) -> AfterValidator:
    return AfterValidator(lambda value: value if value is None else check(value))


def no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def check_cursor(value: str) -> str:
    decode_cursor(value)
    return value


@router.get(
    "/messages", response_model=MessagePage, summary="List stored messages", responses=UNAVAILABLE
)
async def list_messages(
    store: StoreDep,
    settings: SettingsDep,
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
    since: Annotated[
        str | None,
        Query(
            description="Only messages with ts >= since (ISO-8601 UTC, like ts)",
            json_schema_extra={"pattern": INSTANT_PATTERN},
        ),
        optional(check_instant),
    ] = None,
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
            description="next_cursor from the previous page: keyset paging",
            json_schema_extra={"pattern": CURSOR_PATTERN},
        ),
        optional(check_cursor),
    ] = None,
) -> Response:
    query = ListQuery(
        limit=limit,
        offset=offset,
        sender=sender,
        since_key=None if since is None else instant_key(since),
        q=q or None,
        after=decode_cursor(cursor) if cursor is not None else None,
    )
    try:
        page = await store.list_messages(query)
    except StorageUnavailable as exc:
        logger.warning("read failed", extra={"reason": str(exc)})
        return unavailable(settings)
    return json_response(page.model_dump_json().encode())


@router.get("/stats", response_model=Stats, summary="Message counts", responses=UNAVAILABLE)
async def stats(store: StoreDep, settings: SettingsDep) -> Response:
    try:
        result = await store.stats()
    except StorageUnavailable as exc:
        logger.warning("read failed", extra={"reason": str(exc)})
        return unavailable(settings)
    return json_response(result.model_dump_json(by_alias=True).encode())


# HEAD too (`curl -I` and some load balancers probe with it), kept out of the schema so
# each operation is described once.
@router.head("/health/live", include_in_schema=False)
@router.get("/health/live", summary="Liveness: the process serves requests")
async def live() -> dict[str, str]:
    return {"status": "ok"}


@router.head("/health/ready", include_in_schema=False)
@router.get(
    "/health/ready",
    summary="Readiness: database, schema and secret are in place",
    responses={503: {"description": "Not ready", "content": JSON_OBJECT}},
)
async def ready(settings: SettingsDep, store: StoreDep) -> Response:
    if not settings.webhook_secret.get_secret_value():
        return json_response(b'{"status":"unavailable"}', 503)
    try:
        await asyncio.wait_for(store.ping(), READY_TIMEOUT_SECONDS)
    except (StorageUnavailable, TimeoutError) as exc:
        reason = str(exc) or "database did not answer in time"
        logger.warning("not ready", extra={"reason": reason})
        return json_response(b'{"status":"unavailable"}', 503)
    return json_response(b'{"status":"ready"}')


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(content=metrics.render(), media_type=Metrics.content_type)
