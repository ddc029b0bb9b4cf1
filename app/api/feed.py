"""GET /feed and GET /feed/stream: every stored message once, in position order.

The guarantee and how each backend keeps it are in docs/feed.md; the fan-out behind the
stream is app/feed_hub.py.
"""

from __future__ import annotations

import logging
from typing import Annotated, cast

import anyio
from fastapi import APIRouter, Query, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Receive, Scope, Send

from app.api.deps import UNAVAILABLE, FeedHubDep, SettingsDep, StoreDep, json_response, unavailable
from app.api.params import Sender
from app.feed_hub import FeedHub, Subscriber, feed_page, read_waiting
from app.models import FEED_LIMIT_MAX, FeedHead, FeedPage, FeedQuery
from app.storage import StorageUnavailable

logger = logging.getLogger("app.api")

router = APIRouter()

# Positions are 64-bit signed integers in both databases.
POSITION_MAX = 2**63 - 1
# A long poll answers within this, under the 10 s a proxy in front commonly allows a quiet
# upstream (the Compose stack's HAProxy: `timeout server 10s`).
WAIT_MAX_SECONDS = 8.0
# A comment line this often, so that proxies do not close a quiet stream.
KEEPALIVE_SECONDS = 15.0
SHUTDOWN_GRACE_SECONDS = 1.0

After = Annotated[
    int,
    Query(ge=0, le=POSITION_MAX, description="Only messages after this position"),
]


@router.get(
    "/feed",
    response_model=FeedPage,
    summary="Stored messages in arrival order, each once (poll with after=next_after)",
    responses=UNAVAILABLE,
)
async def feed(
    store: StoreDep,
    settings: SettingsDep,
    after: After = 0,
    limit: Annotated[int, Query(ge=1, le=FEED_LIMIT_MAX)] = 100,
    sender: Sender = None,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=WAIT_MAX_SECONDS,
            description="When nothing follows `after`, wait up to this many seconds for a"
            " message before answering (a long poll)",
        ),
    ] = 0,
) -> Response:
    query = FeedQuery(after=after, limit=limit, sender=sender)
    try:
        batch = await read_waiting(store, query, wait)
    except StorageUnavailable as exc:
        logger.warning("read failed", extra={"reason": str(exc)})
        return unavailable(settings)
    return json_response(feed_page(batch.rows, after))


@router.get(
    "/feed/head",
    response_model=FeedHead,
    summary="Where the feed stands now: follow from here to get only what arrives next",
    responses=UNAVAILABLE,
)
async def feed_head(store: StoreDep, settings: SettingsDep) -> Response:
    # For a consumer that starts from the present (the console: its head, then its
    # snapshot of the conversations, then the stream after the head), not from the start.
    try:
        head = await store.feed_head()
    except StorageUnavailable as exc:
        logger.warning("read failed", extra={"reason": str(exc)})
        return unavailable(settings)
    return json_response(b'{"position":%d}' % head)


class FeedStream(EventSourceResponse):
    """sse-starlette's response (pings, disconnects, the server's shutdown), with two
    changes:

    - it ends at once when the hub drops a subscriber too slow to keep up: its send may
      be stuck behind a full socket, which only cancelling ends;
    - each chunk is sent without a cancel scope of its own. sse-starlette wraps every
      send in `anyio.move_on_after(send_timeout)`, even without a timeout: measured with
      1,000 subscribers, that took a wake-up's fan-out from about 4 to 11-35 ms (docs/
      feed.md). `_send_with_timeout` is sse-starlette's own (3.7; pyproject.toml pins
      the minor): should a later version drop it, this override goes unused and every
      chunk takes sse-starlette's path again, correct but slower.
    """

    def __init__(self, hub: FeedHub, after: int, sender: str | None) -> None:
        self._scope = anyio.CancelScope()
        self.subscriber = Subscriber(
            after, sender, limit=hub.subscriber_buffer_bytes, on_drop=self._scope.cancel
        )
        super().__init__(
            hub.stream(self.subscriber),
            ping=KEEPALIVE_SECONDS,
            sep="\n",
            ping_message_factory=lambda: ServerSentEvent(comment="keep-alive", sep="\n"),
            # On the server's shutdown sse-starlette calls set() on this, then waits up to
            # the grace period for the stream to end by itself: it does, at once, with the
            # chunked body's terminator, rather than being cancelled mid-response.
            shutdown_event=cast("anyio.Event", _EndOnShutdown(self.subscriber)),
            shutdown_grace_period=SHUTDOWN_GRACE_SECONDS,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self._scope:
            await super().__call__(scope, receive, send)

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        await send(message)


EVENT_SCHEMA = {
    "type": "object",
    "required": ["id", "event", "data"],
    "properties": {
        "id": {"type": "string", "pattern": "^[0-9]+$", "description": "the position"},
        "event": {"const": "message"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": "the item, as in GET /feed",
        },
    },
}


class _EndOnShutdown:
    """What sse-starlette needs of its shutdown event: set()."""

    def __init__(self, subscriber: Subscriber) -> None:
        self.subscriber = subscriber

    def set(self) -> None:
        self.subscriber.end()


# Read by hand, documented here: declared as `int | None`, the OpenAPI document would
# offer `null` for a header, which a client can only send as the text "null".
LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "description": "The last id received; wins over `after` (a reconnecting EventSource"
    " sends it with the original URL)",
    "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
}
_BAD_LAST_EVENT_ID = (
    b'{"detail":[{"loc":["header","Last-Event-ID"],'
    b'"msg":"must be a position: 1 to 18 digits","type":"value_error"}]}'
)


@router.get(
    "/feed/stream",
    summary="The feed as Server-Sent Events, live",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "`id: <position>`, `event: message`, `data: <the /feed item>`;"
            " resumes after Last-Event-ID or `after`",
            # OpenAPI before 3.2: `schema` describes each event.
            "content": {"text/event-stream": {"schema": EVENT_SCHEMA}},
        }
    },
    openapi_extra={"parameters": [LAST_EVENT_ID]},
)
async def feed_stream(
    request: Request, hub: FeedHubDep, after: After = 0, sender: Sender = None
) -> Response:
    resume = request.headers.get("last-event-id")
    if resume is not None:
        resume = resume.strip()
        if not (resume.isascii() and resume.isdigit() and len(resume) <= 18):
            return json_response(_BAD_LAST_EVENT_ID, 422)
        after = int(resume)
    return FeedStream(hub, after, sender)
