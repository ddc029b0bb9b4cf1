"""The HTML the service serves: the console at `/`, and /docs and /redoc from local assets.

Static files only (app/static/): the console is one HTML shell, a style sheet and a
JavaScript module that call the JSON API, so there is one API surface, and the pages
work offline. Every page gets a strict Content-Security-Policy: no inline script, no
third-party origin.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_PATH = "/static"

# The console's own policy: nothing but this origin, no inline script or style.
CONSOLE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
# Swagger UI and ReDoc are not ours: both set styles inline (ReDoc writes <style>
# elements at run time), and ReDoc searches in a worker it builds from a blob. Script
# still comes from this origin only.
DOCS_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline';"
    " img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:;"
    " frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

console_router = APIRouter(include_in_schema=False)
docs_router = APIRouter(include_in_schema=False)


@functools.cache
def _read(name: str) -> bytes:
    # Read once, on first use: the files ship with the service and never change.
    return (STATIC_DIR / name).read_bytes()


def html(name: str, policy: str) -> Response:
    return Response(
        content=_read(name),
        media_type="text/html; charset=utf-8",
        headers={
            "content-security-policy": policy,
            "x-frame-options": "DENY",
            "referrer-policy": "no-referrer",
        },
    )


@console_router.get("/")
async def console_page() -> Response:
    return html("console/index.html", CONSOLE_CSP)


@docs_router.get("/docs")
async def swagger_ui() -> Response:
    return html("docs/swagger.html", DOCS_CSP)


@docs_router.get("/redoc")
async def redoc() -> Response:
    return html("docs/redoc.html", DOCS_CSP)


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)
