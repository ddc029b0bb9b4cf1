"""What every route shares: the app's state, typed dependencies, replies, the body reader."""

from __future__ import annotations

from typing import Annotated, Any, TypedDict

from fastapi import Depends, Request, Response
from starlette.types import Receive

from app.config import Settings
from app.feed_hub import FeedHub
from app.metrics import Metrics
from app.rejections import RejectionRecorder
from app.storage import MessageStore

# OpenAPI fragments the routes share.
JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "The database cannot answer now; retry after Retry-After",
        "content": JSON_OBJECT,
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    }
}


class AppState(TypedDict):
    """What the lifespan yields; FastAPI hands a copy to every request as request.state."""

    settings: Settings
    store: MessageStore
    metrics: Metrics
    feed: FeedHub
    recorder: RejectionRecorder


# The dependencies are coroutines on purpose: FastAPI runs a plain `def` dependency in a
# worker thread, which would cost a thread hop per request for a dictionary lookup.


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.state.settings
    return settings


async def get_store(request: Request) -> MessageStore:
    store: MessageStore = request.state.store
    return store


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.state.metrics
    return metrics


async def get_feed_hub(request: Request) -> FeedHub:
    hub: FeedHub = request.state.feed
    return hub


async def get_recorder(request: Request) -> RejectionRecorder:
    recorder: RejectionRecorder = request.state.recorder
    return recorder


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[MessageStore, Depends(get_store)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
FeedHubDep = Annotated[FeedHub, Depends(get_feed_hub)]
RecorderDep = Annotated[RejectionRecorder, Depends(get_recorder)]


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


class PayloadTooLarge(Exception):
    """The body is larger than the endpoint's limit; nothing more of it is read."""


class ClientDisconnected(Exception):
    """The client went away before its body arrived whole."""


async def read_body(receive: Receive, declared: bytes | None, limit: int) -> bytes:
    """The raw body, refused as soon as it is known to exceed `limit` bytes.

    `declared` is the Content-Length header as sent (None without one).
    """
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge
    chunks: list[bytes] = []
    size = 0
    # Counted as it streams: a chunked body has no Content-Length to trust.
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
