"""POST, GET and DELETE /session: the console's sign-in, for when READ_TOKENS is set.

A browser cannot send a bearer token by itself; it presents one once here and gets a
signed, expiring, HttpOnly cookie that the access guard accepts as a read credential
(app/session.py). Public: /session needs no credential, it is how one gets one.
"""

from __future__ import annotations

import json
import logging
import time
from urllib.parse import parse_qs

from fastapi import APIRouter, Request, Response

from app.api.deps import SettingsDep, json_response
from app.session import COOKIE, SessionCookies, cookie_value, token_matches

logger = logging.getLogger("app.api")

router = APIRouter(tags=["console"])

TOKEN_MAX_BYTES = 4096
FORM = "application/x-www-form-urlencoded"


def presented_token(body: bytes, content_type: str) -> str | None:
    """The token of a JSON `{"token": ...}` or a form `token=...`; None if neither."""
    try:
        if content_type.split(";")[0].strip().lower() == FORM:
            values = parse_qs(body.decode("utf-8"), max_num_fields=4).get("token", [])
            return values[0] if len(values) == 1 else None
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        return None
    token = data.get("token") if isinstance(data, dict) else None
    return token if isinstance(token, str) else None


ALLOW = "GET, POST, DELETE"


# The three methods are three routes, so a wrong method would get the 405 of the first
# one, with `Allow: GET`; this route answers the other methods with all three.
@router.api_route(
    "/session",
    methods=["PUT", "PATCH", "OPTIONS", "HEAD", "TRACE"],
    include_in_schema=False,
)
async def other_methods() -> Response:
    return json_response(b'{"detail":"Method Not Allowed"}', 405, headers={"allow": ALLOW})


@router.get("/session", summary="Whether sign-in is needed, and whether this browser has a session")
async def session_state(request: Request, settings: SettingsDep) -> Response:
    tokens = settings.read_token_list()
    signed_in = bool(tokens) and SessionCookies(tokens).check(request.scope["headers"]) is True
    body = {"required": bool(tokens), "signed_in": signed_in}
    return json_response(json.dumps(body).encode())


@router.post(
    "/session",
    status_code=204,
    summary="Sign in with a read token: sets the console's session cookie",
    responses={
        401: {"description": "Not one of READ_TOKENS"},
        404: {"description": "READ_TOKENS is not set"},
    },
)
async def sign_in(request: Request, settings: SettingsDep) -> Response:
    tokens = settings.read_token_list()
    if not tokens:
        return json_response(b'{"detail":"sign-in is off: READ_TOKENS is not set"}', 404)
    body = await request.body()
    token = (
        None
        if len(body) > TOKEN_MAX_BYTES
        else presented_token(body, request.headers.get("content-type", ""))
    )
    if token is None or not token_matches(token, tokens):
        return json_response(b'{"detail":"invalid token"}', 401)
    ttl = settings.session_ttl_seconds
    response = Response(status_code=204)
    response.set_cookie(
        COOKIE,
        cookie_value(token, time.time(), ttl),
        max_age=ttl,
        path="/",
        secure=request.scope.get("scheme") == "https",
        httponly=True,
        samesite="strict",
    )
    return response


@router.delete("/session", status_code=204, summary="Sign out: clears the session cookie")
async def sign_out(request: Request) -> Response:
    response = Response(status_code=204)
    response.delete_cookie(
        COOKIE,
        path="/",
        secure=request.scope.get("scheme") == "https",
        httponly=True,
        samesite="strict",
    )
    return response
