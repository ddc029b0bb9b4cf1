"""GET /feed and GET /feed/stream: every stored message once, in position order.

The guarantee and how each backend keeps it are in docs/feed.md; the fan-out behind the
stream is app/feed_hub.py.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Response
from pydantic import BeforeValidator
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Receive, Scope, Send

from app.api.deps import UNAVAILABLE, FeedHubDep, SettingsDep, StoreDep, json_response, unavailable
from app.api.messages import SENDER_PATTERN, optional, plus_for_space
from app.feed_hub import FeedHub, Subscriber, feed_page, read_waiting
from app.models import FEED_LIMIT_MAX, FeedPage, FeedQuery, check_msisdn
from app.storage import StorageUnavailable

logger = logging.getLogger("app.api")

router = APIRouter()

# Positions are 64-bit signed integers in both databases.
POSITION_MAX = 2**63 - 1
WAIT_MAX_SECONDS = 30.0
# A comment line this often, so that proxies do not close a quiet stream.
KEEPALIVE_SECONDS = 15.0

Sender = Annotated[
    str | None,
    Query(
        alias="from",
        description="Only this sender, E.164 (a leading space reads as '+')",
        json_schema_extra={"pattern": SENDER_PATTERN},
    ),
    BeforeValidator(plus_for_space),
    optional(check_msisdn),
]
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
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with self._scope:
            await super().__call__(scope, receive, send)

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        await send(message)


def last_event_id(value: Any) -> Any:
    # EventSource sends back the last id it saw; ours are positions.
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return value


@router.get(
    "/feed/stream",
    summary="The feed as Server-Sent Events, live",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "`id: <position>`, `event: message`, `data: <the /feed item>`;"
            " resumes after Last-Event-ID or `after`",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    },
)
async def feed_stream(
    hub: FeedHubDep,
    after: After = 0,
    sender: Sender = None,
    resume: Annotated[
        int | None,
        Header(
            alias="Last-Event-ID",
            ge=0,
            le=POSITION_MAX,
            description="The last id received; wins over `after` (a reconnecting"
            " EventSource sends it with the original URL)",
        ),
        BeforeValidator(last_event_id),
    ] = None,
) -> Response:
    return FeedStream(hub, after if resume is None else resume, sender)
