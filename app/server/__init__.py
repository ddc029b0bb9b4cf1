"""`python -m app serve`: uvicorn, with our HTTP protocol when uvicorn is the one it knows.

limits.py and coalescing.py subclass uvicorn's httptools protocol and lean on names that
uvicorn does not promise to keep (its `_types`, private methods, a copy of its `send`).
pyproject.toml pins the minor they were written against, and this module checks the
installed version before using them: on any other version the server runs with
uvicorn's own protocol and says so once, and the head and body limits must then come
from a reverse proxy (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import logging
import resource

import uvicorn

from app.config import Settings
from app.logging_utils import configure_logging, uvicorn_log_config

logger = logging.getLogger("app.server")

# The uvicorn minor limits.py and coalescing.py were written against.
PROTOCOL_UVICORN_MINOR = "0.54"
# File descriptors kept out of the connection limit: the database's files and
# connections, the listening socket, the event loop's own, logs.
RESERVED_DESCRIPTORS = 96
DEFAULT_MAX_CONNECTIONS = 1000


def max_connections(configured: int | None, soft_limit: int | None = None) -> int:
    """HTTP_MAX_CONNECTIONS, or the default: what RLIMIT_NOFILE leaves room for, up to
    DEFAULT_MAX_CONNECTIONS. A configured value the limit cannot hold is lowered to
    what it can (with a warning): past it, accept() fails and every new client is reset.
    """
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        room = 1_000_000
    else:
        room = max(1, soft_limit - RESERVED_DESCRIPTORS)
    if configured is None:
        return min(DEFAULT_MAX_CONNECTIONS, room)
    if configured > room:
        logger.warning(
            "HTTP_MAX_CONNECTIONS is more than the open-files limit allows; lowered",
            extra={"configured": configured, "max_connections": room, "nofile": soft_limit},
        )
        return room
    return configured


def http_protocol(
    settings: Settings, version: str = uvicorn.__version__
) -> type[asyncio.Protocol] | str:
    """Our guarded protocol class, or "httptools" (uvicorn's) on an unknown uvicorn."""
    if version.split(".")[:2] != PROTOCOL_UVICORN_MINOR.split("."):
        logger.warning(
            "uvicorn version not supported by our protocol; using uvicorn's own, without"
            " the head and body limits",
            extra={"uvicorn": version, "supported": PROTOCOL_UVICORN_MINOR + ".x"},
        )
        return "httptools"
    # Imported only once the version is known: on another uvicorn, the private names
    # these modules import may not exist at all.
    from app.server.limits import guarded_protocol

    return guarded_protocol(
        max_head_bytes=settings.http_max_head_bytes,
        head_timeout=settings.http_head_timeout_seconds,
        body_timeout=settings.http_body_timeout_seconds,
        max_connections=max_connections(settings.http_max_connections),
        retry_after=settings.retry_after_seconds,
    )


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the app until SIGTERM or SIGINT, with JSON logs from the first line."""
    configure_logging(settings.log_level)
    protocol = http_protocol(settings)
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        log_config=uvicorn_log_config(settings.log_level),
        http=protocol,
        # uvicorn's own protocol has no connection limit of ours: its cruder one (it
        # refuses past the limit, in plain text) is better than none.
        limit_concurrency=(
            max_connections(settings.http_max_connections) if protocol == "httptools" else None
        ),
        server_header=False,
        # Our middleware writes the access line; uvicorn's own would cost the arguments
        # of a disabled log call on every response.
        access_log=False,
        # Client addresses are never used or logged, so X-Forwarded-* need no parsing.
        proxy_headers=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=20,
    )
