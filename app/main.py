"""Builds the app: `uvicorn --factory app.main:create_app`."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.access import AccessPolicy
from app.api import console, feed, lifecycle, messages, pages, probes, session, whatsapp
from app.api.deps import AppState, BodyBudget
from app.api.webhook import PATH, WebhookEndpoint, openapi_operation
from app.config import ConfigError, Settings, load_settings
from app.feed_hub import FeedHub
from app.logging_utils import configure_logging, refuse_to_start
from app.metrics import Metrics
from app.middleware import DirectRoutes, ObservabilityMiddleware
from app.rejections import RejectionRecorder
from app.retention import Retention
from app.storage import MessageStore, StorageUnavailable, open_store
from app.tasks import cancel_and_wait

logger = logging.getLogger("app")

VERSION = "1.0.0"


@functools.cache
def settle_heap() -> None:
    """Take everything built so far out of the garbage collector's sight.

    Modules, the app, schemas and settings live as long as the process; without this,
    every full collection walks them all again, which on a busy server shows up as
    latency spikes. Young collections also run less often: a request allocates many
    short-lived containers, and the default threshold (700) collected every few requests.
    Once per process: a server starts one app, and the tests, which start a thousand,
    would pay a full collection (~35 ms) for each.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)


class ReceiverApp(FastAPI):
    """FastAPI, with the direct routes (POST /webhook) answered in front of its stack.

    Three hooks differ from FastAPI's:

    - `__call__` goes straight to the middleware stack (FastAPI's own reads the
      environment on every request, for OpenTelemetry, which this service does not use);
    - `build_middleware_stack` puts the observability middleware outermost, with the
      table of direct routes, so direct and FastAPI routes get the same request ids,
      metrics, access lines and headers;
    - `openapi` adds the direct routes' operations, which FastAPI cannot see.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        metrics: Metrics,
        recorder: RejectionRecorder,
        policy: AccessPolicy,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.receiver_settings = settings
        self.metrics = metrics
        self.recorder = recorder
        self.policy = policy
        self.fixed_paths = {
            path for path in (self.openapi_url, self.docs_url, self.redoc_url) if path
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        # Straight to the stack: FastAPI's own __call__ reads the environment on every
        # request to decide on OpenTelemetry, which this service does not use.
        scope["app"] = self
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        await self.middleware_stack(scope, receive, send)

    def build_middleware_stack(self) -> ASGIApp:
        endpoint = WebhookEndpoint(self.receiver_settings, self.metrics, self.recorder)
        direct = DirectRoutes({PATH: endpoint})
        return ObservabilityMiddleware(
            super().build_middleware_stack(),
            self.metrics,
            self.policy,
            direct,
            frozenset({PATH, *self.fixed_paths}),
        )

    def include_router(self, router: APIRouter, **kwargs: Any) -> None:
        super().include_router(router, **kwargs)
        # Noted for the metrics of refused requests, which no router sees (the paths are
        # fixed: a template with parameters is not a path a request names).
        prefix = kwargs.get("prefix", "")
        self.fixed_paths.update(
            prefix + path
            for route in router.routes
            if isinstance(path := getattr(route, "path", None), str) and "{" not in path
        )

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            schema = get_openapi(
                title=self.title,
                version=self.version,
                summary=self.summary,
                description=self.description,
                routes=self.routes,
            )
            schema["paths"] = {"/webhook": openapi_operation(), **schema["paths"]}
            self.openapi_schema = schema
        return self.openapi_schema


StoreOpener = Callable[[Settings], Awaitable[MessageStore]]


def create_app(
    settings: Settings | None = None, *, store_opener: StoreOpener = open_store
) -> FastAPI:
    """The app, on `settings` (default: the environment's).

    `store_opener` opens the store in the lifespan; tests pass one that wraps the real
    store in a deliberately broken one, to prove a test can fail.
    """
    if settings is None:
        try:
            settings = load_settings()
        except ConfigError as exc:
            refuse_to_start(str(exc))
            # SystemExit, not an exception: uvicorn would print a traceback for the latter.
            raise SystemExit(2) from None
    configure_logging(settings.log_level)
    metrics = Metrics()
    recorder = RejectionRecorder(metrics, settings.rejections_kept)
    policy = AccessPolicy.from_settings(settings)
    warn_about_exposure(settings, policy)
    app_settings = settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[AppState]:
        try:
            store = await store_opener(app_settings)
        except StorageUnavailable as exc:
            # The cause on one line; uvicorn then logs a traceback and exits with 3.
            logger.critical("cannot start", extra={"reason": str(exc)})
            raise
        hub = FeedHub(store)
        metrics.follow_feed(hub)
        recorder.start(store)
        retention = asyncio.create_task(
            Retention(store, app_settings, metrics).run_forever(), name="retention"
        )
        settle_heap()
        logger.info(
            "ready to receive",
            extra={"database": app_settings.database.scheme, "version": VERSION},
        )
        try:
            yield {
                "settings": app_settings,
                "store": store,
                "metrics": metrics,
                "feed": hub,
                "recorder": recorder,
                "body_budget": BodyBudget(app_settings.body_buffer_budget_bytes),
            }
        finally:
            gc.unfreeze()
            await cancel_and_wait(retention)
            await hub.close()
            await recorder.stop(store)
            await store.close()
            logger.info("store closed")

    docs = settings.docs_enabled
    app = ReceiverApp(
        settings=settings,
        metrics=metrics,
        recorder=recorder,
        policy=policy,
        # /messages/ is a 404, not a redirect: Starlette builds the redirect's URL from the
        # Host header, which would send clients wherever a forged header says.
        redirect_slashes=False,
        title="Webhook receiver",
        version=VERSION,
        summary="Signed WhatsApp-style messages in, exactly once; list, search and count them.",
        lifespan=lifespan,
        # /docs and /redoc are app.api.pages' own: assets shipped with the service, no CDN.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.include_router(messages.router)
    # After /messages, and export before the id route (see app/api/lifecycle.py).
    app.include_router(lifecycle.router)
    app.include_router(feed.router)
    app.include_router(console.router)
    app.include_router(probes.router)
    if settings.console_enabled:
        app.include_router(pages.console_router)
        app.include_router(session.router)
    if docs:
        app.include_router(pages.docs_router)
    if settings.console_enabled or docs:
        app.mount(pages.STATIC_PATH, pages.static_files(), name="static")
    if settings.whatsapp_enabled:
        app.include_router(whatsapp.router)
    elif settings.whatsapp_app_secret is not None or settings.whatsapp_verify_token is not None:
        missing = (
            "WHATSAPP_APP_SECRET"
            if settings.whatsapp_app_secret is None
            else "WHATSAPP_VERIFY_TOKEN"
        )
        logger.warning(
            "WhatsApp endpoint disabled until both settings are set", extra={"missing": missing}
        )
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, internal_error)
    return app


def warn_about_exposure(settings: Settings, policy: AccessPolicy) -> None:
    """One WARNING line per weakness that start-up lets through: open reads, short secrets."""
    if policy.reads_open:
        logger.warning(
            "reads are open: READ_TOKENS is not set, so /messages, /stats and the API docs"
            " answer anyone who reaches the port (see docs/security.md)",
            extra={"setting": "READ_TOKENS"},
        )
    for variable, why in settings.weak_secrets():
        logger.warning(f"{variable} is {why}", extra={"setting": variable})


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    # The same generic body as the webhook's, instead of Starlette's plain text. Starlette
    # re-raises after answering, and the observability middleware logs it (type and stack).
    return JSONResponse({"detail": "internal server error"}, status_code=500)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's shape, without echoing the input back.
    errors = [
        {
            "loc": list(error.get("loc", ())),
            "msg": error.get("msg", ""),
            "type": error.get("type", ""),
        }
        for error in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=422)
