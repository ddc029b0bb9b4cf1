"""One message by id, erasure, and the NDJSON export (docs/lifecycle.md).

Route order matters: /messages/export is declared before /messages/{message_id:path},
so a GET of that exact path is the export. A message whose id is literally `export` is
still in every export, and DELETE /messages/export erases it (the export is GET only).
The `:path` converter lets an id hold `/` (sent as is, or as %2F).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BeforeValidator

from app.api.admin import AdminDep, audit_erasure
from app.api.deps import (
    JSON_OBJECT,
    UNAVAILABLE,
    MetricsDep,
    SettingsDep,
    StoreDep,
    json_response,
    unavailable,
)
from app.api.params import Recipient, Search, Sender, Since, Until, plus_for_space
from app.models import (
    E164_PATTERN,
    MESSAGE_ID_MAX,
    ListQuery,
    StoredMessage,
    check_msisdn,
    instant_key,
)
from app.storage import StorageUnavailable
from app.storage.lifecycle import export_line
from app.storage.rows import Row

logger = logging.getLogger("app.api")

router = APIRouter(tags=["lifecycle"])

NDJSON = "application/x-ndjson"
NOT_FOUND = b'{"detail":"message not found"}'
ERASED: dict[int | str, dict[str, object]] = {
    200: {
        "description": "Erased: how many messages were deleted, how many tombstones written",
        "content": JSON_OBJECT,
    },
    401: {"description": "Missing or invalid admin token", "content": JSON_OBJECT},
    404: {
        "description": "ADMIN_TOKENS is unset, or (by id) no such message",
        "content": JSON_OBJECT,
    },
    **UNAVAILABLE,
}
MessageId = Annotated[str, Path(description="The message_id; may contain '/'")]


def storable(message_id: str) -> bool:
    """Whether an id could have been stored at all (/webhook's rules)."""
    return 0 < len(message_id) <= MESSAGE_ID_MAX and "\x00" not in message_id


def erased_body(deleted: int, tombstones: int) -> bytes:
    return b'{"deleted":%d,"tombstones":%d}' % (deleted, tombstones)


@router.get(
    "/messages/export",
    summary="Every matching message as NDJSON, streamed",
    response_class=StreamingResponse,
    responses={200: {"content": {NDJSON: {}}}, **UNAVAILABLE},
)
async def export_messages(
    store: StoreDep,
    settings: SettingsDep,
    sender: Sender = None,
    recipient: Recipient = None,
    since: Since = None,
    until: Until = None,
    q: Search = None,
) -> Response:
    query = ListQuery(
        sender=sender,
        recipient=recipient,
        since_key=None if since is None else instant_key(since),
        until_key=None if until is None else instant_key(until),
        q=q or None,
    )
    pages = aiter(store.lifecycle.export(query))
    # The first page before the answer: a database that is down gets a 503, not a 200
    # with an empty body.
    try:
        first: list[Row] = await anext(pages, [])
    except StorageUnavailable as exc:
        logger.warning("read failed", extra={"reason": str(exc)})
        return unavailable(settings)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return StreamingResponse(
        _lines(first, pages),
        media_type=NDJSON,
        headers={"content-disposition": f'attachment; filename="messages-{stamp}.ndjson"'},
    )


async def _lines(first: list[Row], pages: AsyncIterator[list[Row]]) -> AsyncIterator[bytes]:
    if first:
        yield b"".join(map(export_line, first))
    try:
        async for page in pages:
            yield b"".join(map(export_line, page))
    except StorageUnavailable as exc:
        # The status is sent: breaking the connection is how the client learns that the
        # body is incomplete (no final chunk), rather than a short file that looks whole.
        logger.warning("export interrupted", extra={"reason": str(exc)})
        raise


@router.get(
    "/messages/{message_id:path}",
    response_model=StoredMessage,
    summary="One stored message",
    responses={404: {"description": "No such message", "content": JSON_OBJECT}, **UNAVAILABLE},
)
async def get_message(message_id: MessageId, store: StoreDep, settings: SettingsDep) -> Response:
    if not storable(message_id):
        return json_response(NOT_FOUND, 404)
    try:
        found = await store.lifecycle.get_message(message_id)
    except StorageUnavailable as exc:
        logger.warning("read failed", extra={"reason": str(exc)})
        return unavailable(settings)
    if found is None:
        return json_response(NOT_FOUND, 404)
    return json_response(found.model_dump_json().encode())


# GET and DELETE are two routes, so another method would get the 405 of the first one,
# with `Allow: GET`; these routes answer the other methods with what each path documents
# (the export's path is GET only there, though DELETE erases a message named "export").
OTHER_METHODS = ["PUT", "PATCH", "POST", "OPTIONS", "HEAD", "TRACE"]
NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'


@router.api_route("/messages/export", methods=OTHER_METHODS, include_in_schema=False)
async def other_methods_on_export() -> Response:
    return json_response(NOT_ALLOWED, 405, headers={"allow": "GET"})


@router.api_route("/messages/{message_id:path}", methods=OTHER_METHODS, include_in_schema=False)
async def other_methods() -> Response:
    return json_response(NOT_ALLOWED, 405, headers={"allow": "GET, DELETE"})


@router.delete(
    "/messages/{message_id:path}",
    summary="Erase one message, and refuse its redelivery (ADMIN_TOKENS)",
    responses=ERASED,
)
async def erase_message(
    admin: AdminDep,
    message_id: MessageId,
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> Response:
    if not storable(message_id):
        return json_response(NOT_FOUND, 404)
    try:
        erasure = await store.lifecycle.erase_message(message_id)
    except StorageUnavailable as exc:
        logger.warning("erasure failed", extra={"reason": str(exc)})
        return unavailable(settings)
    metrics.erased.labels(kind="message").inc(erasure.deleted)
    audit_erasure(request, admin, "message", erasure)
    if not erasure.deleted:
        return json_response(NOT_FOUND, 404)
    return json_response(erased_body(erasure.deleted, erasure.tombstones))


@router.delete(
    "/numbers/{e164}",
    summary="Erase every message from or to a number (ADMIN_TOKENS)",
    responses=ERASED,
)
async def erase_number(
    admin: AdminDep,
    e164: Annotated[
        str,
        Path(
            description="The number, E.164 ('+' may also come as %2B)",
            json_schema_extra={"pattern": E164_PATTERN},
        ),
        BeforeValidator(plus_for_space),
        AfterValidator(check_msisdn),
    ],
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    metrics: MetricsDep,
) -> Response:
    try:
        erasure = await store.lifecycle.erase_number(e164)
    except StorageUnavailable as exc:
        logger.warning("erasure failed", extra={"reason": str(exc)})
        return unavailable(settings)
    metrics.erased.labels(kind="number").inc(erasure.deleted)
    audit_erasure(request, admin, "number", erasure)
    return json_response(erased_body(erasure.deleted, erasure.tombstones))
