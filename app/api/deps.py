"""What every route shares: the app's state, typed dependencies, replies, the body reader
(within a process-wide budget), and the one way a route runs a read."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Annotated, Any, TypedDict, TypeVar

from fastapi import Depends, Request, Response
from starlette.types import Receive

from app.config import Settings
from app.feed_hub import FeedHub
from app.metrics import Metrics
from app.rejections import RejectionRecorder
from app.storage import MessageStore, QueryTooExpensive, StorageUnavailable

logger = logging.getLogger("app.api")

T = TypeVar("T")

# OpenAPI fragments the routes share.
JSON_OBJECT = {"application/json": {"schema": {"type": "object"}}}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "The database cannot answer now, or the query was too expensive"
        " (it ran past READ_TIMEOUT_SECONDS); retry after Retry-After",
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
    body_budget: BodyBudget


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


TOO_EXPENSIVE = (
    b'{"detail":"query too expensive: it did not finish within the read deadline;'
    b" search with a q of 3 or more characters, or narrow the query with from or since"
    b' (and page with cursor rather than a deep offset)"}'
)
OVERLOADED = b'{"detail":"server busy: too many request bodies in flight, retry later"}'
# A read still running after this long starts watching for its client to go away.
WATCH_AFTER_SECONDS = 0.05


def too_expensive(settings: Settings) -> Response:
    return json_response(
        TOO_EXPENSIVE, 503, headers={"retry-after": str(settings.retry_after_seconds)}
    )


async def answer_read(
    request: Request, read: Awaitable[T], render: Callable[[T], bytes]
) -> Response:
    """The answer to a read route: `render(result)`, or a 503, or nothing for a client gone.

    Every read route goes through here. While the read runs, a watcher waits on the
    request's `receive` for the client going away; if it goes, the watcher cancels this
    request's task, which stops the read's statement in the database (the stores' reads
    stop when cancelled). A read past its deadline (QueryTooExpensive) is a 503 saying so.
    """
    state = request.state
    request_task = asyncio.current_task()
    assert request_task is not None
    gone = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal gone
        await wait_for_disconnect(request.receive)
        gone = True
        request_task.cancel()

    def start_watching() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(watch())

    # The read runs in the request's own task, and the watcher starts only for a read
    # still running after WATCH_AFTER_SECONDS: most reads end sooner, and a timer costs
    # them less than a task would (a client gone meanwhile is seen when it starts).
    timer = asyncio.get_running_loop().call_later(WATCH_AFTER_SECONDS, start_watching)
    try:
        result = await read
    except asyncio.CancelledError:
        if not gone:
            raise  # cancelled from outside (the server is stopping): not ours to answer
        request_task.uncancel()
        state.metrics.read_stopped("client_disconnected")
        # Nobody reads this answer; the access line and the metrics carry it.
        return json_response(b'{"detail":"client disconnected"}', 400)
    except QueryTooExpensive as exc:
        state.metrics.read_stopped("deadline")
        logger.warning("read too expensive", extra={"reason": str(exc)})
        return too_expensive(state.settings)
    except StorageUnavailable as exc:
        logger.warning("read failed", extra={"reason": str(exc)})
        return unavailable(state.settings)
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()
    return json_response(render(result))


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns once the client has gone (or the response is complete)."""
    # A request body, if any, is read and dropped: nothing of it is kept.
    while (await receive())["type"] != "http.disconnect":
        pass


class PayloadTooLarge(Exception):
    """The body is larger than the endpoint's limit; nothing more of it is read."""


class ClientDisconnected(Exception):
    """The client went away before its body arrived whole."""


class BodyBudgetSpent(Exception):
    """Taking this body would pass the process's body budget; nothing more of it is read."""


class BodyBudget:
    """Bytes of request bodies held in memory at once, across every request of the process.

    A body is counted as it arrives and released when its request ends, so slow clients
    each holding part of a large body cannot add up to more than `limit`. Only the event
    loop's thread changes it.
    """

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0


class BodyLease:
    """One request's share of the budget; returned in full when the `with` block ends."""

    __slots__ = ("budget", "held")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    def __enter__(self) -> BodyLease:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.budget.held -= self.held
        self.held = 0

    def take(self, size: int) -> None:
        budget = self.budget
        if budget.held + size > budget.limit:
            raise BodyBudgetSpent
        budget.held += size
        self.held += size


async def read_body(
    receive: Receive,
    declared: bytes | None,
    limit: int,
    lease: BodyLease,
    on_chunk: Callable[[bytes], object] | None = None,
) -> bytes:
    """The raw body, refused as soon as it is known to exceed `limit` bytes or the budget.

    `declared` is the Content-Length header as sent (None without one). Every chunk is
    taken from `lease` as it arrives, and given to `on_chunk` (a streaming signature
    check, say) before the next one is read.
    """
    if declared is not None and declared.isdigit():
        size = int(declared)
        if size > limit:
            raise PayloadTooLarge
        if lease.budget.held + size > lease.budget.limit:
            raise BodyBudgetSpent  # known now: do not read any of it
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
        lease.take(len(chunk))
        if on_chunk is not None:
            on_chunk(chunk)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
