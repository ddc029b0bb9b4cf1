"""The probes and the metrics: GET /health/live, /health/ready and /metrics."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse

from app.api.deps import JSON_OBJECT, MetricsDep, SettingsDep, StoreDep, json_response
from app.metrics import Metrics
from app.storage import MessageStore, StorageUnavailable

logger = logging.getLogger("app.api")

router = APIRouter()

READY_TIMEOUT_SECONDS = 1.0
# Pings given up on at the deadline, still unwinding: a cancelled asyncpg statement waits
# for the server to acknowledge the cancel, which a frozen server never does (it is cut
# short at the write deadline). Held here, not awaited, so that readiness answers at its
# own deadline; each removes itself when it ends.
_abandoned: set[asyncio.Task[None]] = set()


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
        await ping_within(store, READY_TIMEOUT_SECONDS)
    except (StorageUnavailable, TimeoutError) as exc:
        reason = str(exc) or "database did not answer in time"
        logger.warning("not ready", extra={"reason": reason})
        return json_response(b'{"status":"unavailable"}', 503)
    return json_response(b'{"status":"ready"}')


async def ping_within(store: MessageStore, timeout: float) -> None:
    """store.ping(), or TimeoutError after `timeout` without waiting for it to unwind."""
    task = asyncio.create_task(store.ping())
    try:
        await asyncio.wait({task}, timeout=timeout)
    finally:
        if not task.done():
            task.cancel()
            _abandoned.add(task)
            task.add_done_callback(_settled)
    if not task.done():
        raise TimeoutError
    task.result()


def _settled(task: asyncio.Task[None]) -> None:
    _abandoned.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: an abandoned ping's failure was already answered


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(content=metrics.render(), media_type=Metrics.content_type)
