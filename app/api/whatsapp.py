"""The WhatsApp Cloud API endpoint: Meta's subscription handshake, and its signed batches.

Meta posts batches: a list of entries, each with a list of changes, each change's value
carrying messages and/or status updates. Every message of every entry and change becomes
one row of the messages table, idempotently (its `wamid` is the `message_id`); status
updates are counted. A malformed message is logged, counted and skipped, and the batch is
still acknowledged: Meta retries a failed batch for days, and a retry cannot fix it.

Not the hot path, so these are ordinary FastAPI routes; but the body is read raw, within a
size limit and the process's body budget, its signature computed as it streams in and
checked before anything parses it. A batch of up to 3 MB holds tens of thousands of
messages: it is validated and stored SLICE messages at a time, letting other requests
run in between, so that no request waits behind it for long (docs/limits.md).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections import Counter
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import PlainTextResponse

from app.api.deps import (
    OVERLOADED,
    BodyBudgetSpent,
    BodyLease,
    ClientDisconnected,
    MetricsDep,
    PayloadTooLarge,
    RecorderDep,
    SettingsDep,
    StoreDep,
    json_response,
    read_body,
    unavailable,
)
from app.api.whatsapp_batch import SLICE, Batch, parse_batch_in_slices
from app.config import Settings
from app.metrics import Metrics
from app.middleware import request_info
from app.models import InvalidMessage, Message
from app.rejections import (
    FIELD_MAX,
    SIGNATURE_REASONS,
    RejectionRecorder,
    declared_size,
    validation_reason,
)
from app.signature import MALFORMED, InvalidSignature, StreamingHubVerifier
from app.storage import MessageStore, StorageUnavailable

logger = logging.getLogger("app.whatsapp")

router = APIRouter(tags=["whatsapp"])

PATH = "/webhook/whatsapp"
# Meta's challenge is a number; anything else is not echoed into a response body.
_CHALLENGE = re.compile(r"[0-9A-Za-z_-]{1,256}")
# Per batch; past it, one line says how many more were skipped.
_MAX_LOGGED_PROBLEMS = 20


async def store_all(
    store: MessageStore, messages: list[Message]
) -> list[bool | StorageUnavailable]:
    # Handed over a slice at a time, with other requests' turns in between; the store's
    # group commit writes them in few transactions.
    slices = []
    for start in range(0, len(messages), SLICE):
        slices.append(asyncio.ensure_future(store.insert_many(messages[start : start + SLICE])))
        await asyncio.sleep(0)
    outcomes: list[bool | StorageUnavailable] = []
    for part in slices:
        outcomes.extend(await part)
    return outcomes


@router.get(
    PATH,
    summary="Meta's subscription handshake",
    response_class=PlainTextResponse,
    responses={403: {"description": "Wrong mode, token or challenge"}},
)
async def verify_subscription(
    settings: SettingsDep,
    mode: Annotated[str | None, Query(alias="hub.mode")] = None,
    token: Annotated[str | None, Query(alias="hub.verify_token")] = None,
    challenge: Annotated[str | None, Query(alias="hub.challenge")] = None,
) -> Response:
    expected = settings.whatsapp_verify_token
    if expected is None:
        return json_response(b'{"detail":"Not Found"}', 404)
    token_ok = token is not None and hmac.compare_digest(
        token.encode(), expected.get_secret_value().encode()
    )
    if (
        token_ok
        and mode == "subscribe"
        and challenge is not None
        and _CHALLENGE.fullmatch(challenge) is not None
    ):
        return PlainTextResponse(challenge)
    return json_response(b'{"detail":"forbidden"}', 403)


@router.post(
    PATH,
    summary="Receive a signed batch from the WhatsApp Cloud API",
    responses={
        200: {"description": "Batch taken: every valid message stored (or already stored)"},
        401: {"description": "Missing, malformed or wrong X-Hub-Signature-256"},
        413: {"description": "Body larger than WHATSAPP_MAX_BODY_BYTES"},
        422: {"description": "Not a batch: not JSON, not an object, or no list of entries"},
        503: {"description": "Storage cannot take the write now; retry after Retry-After"},
    },
    openapi_extra={
        "parameters": [
            {
                "name": "X-Hub-Signature-256",
                "in": "header",
                "required": True,
                "description": "sha256= and the hex HMAC-SHA256 of the raw body, keyed with"
                " WHATSAPP_APP_SECRET.",
                "schema": {"type": "string", "pattern": "^sha256=[0-9a-fA-F]{64}$"},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
    },
)
async def receive_batch(
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    metrics: MetricsDep,
    recorder: RecorderDep,
) -> Response:
    secret = settings.whatsapp_app_secret
    if secret is None:
        return json_response(b'{"detail":"Not Found"}', 404)
    scope = request.scope
    info = request_info(scope)
    declared = _content_length(request.headers.get("content-length"))
    signatures = request.headers.getlist("x-hub-signature-256")
    try:
        if len(signatures) > 1:
            raise InvalidSignature(MALFORMED)
        verifier = StreamingHubVerifier(
            signatures[0] if signatures else None, [secret.get_secret_value().encode()]
        )
    except InvalidSignature as exc:
        metrics.whatsapp("invalid_signature")
        size = int(declared) if declared is not None and declared.isdigit() else 0
        recorder.refuse(
            scope, PATH, SIGNATURE_REASONS[exc.reason], size, request_id=info.request_id
        )
        # Refused before the body: none of it is read, so the connection cannot be reused.
        return json_response(
            b'{"detail":"invalid signature"}', 401, headers={"connection": "close"}
        )
    # The body counts against the process's budget until the batch is answered.
    with BodyLease(request.state.body_budget) as lease:
        try:
            raw = await read_body(
                request.receive, declared, settings.whatsapp_max_body_bytes, lease, verifier.update
            )
        except PayloadTooLarge:
            metrics.whatsapp("payload_too_large")
            size = declared_size(declared, settings.whatsapp_max_body_bytes)
            recorder.refuse(scope, PATH, "body_too_large", size, request_id=info.request_id)
            # The rest of the body is never read, so the connection cannot be reused.
            return json_response(
                b'{"detail":"payload too large"}', 413, headers={"connection": "close"}
            )
        except BodyBudgetSpent:
            # The server's state, not the delivery's fault: not recorded as a refusal.
            metrics.whatsapp("overloaded")
            return json_response(
                OVERLOADED,
                503,
                headers={
                    "retry-after": str(settings.retry_after_seconds),
                    "connection": "close",
                },
            )
        except ClientDisconnected:
            metrics.whatsapp("client_disconnected")
            return json_response(b'{"detail":"client disconnected"}', 400)
        try:
            verifier.verify()
        except InvalidSignature as exc:
            metrics.whatsapp("invalid_signature")
            reason = SIGNATURE_REASONS[exc.reason]
            recorder.refuse(scope, PATH, reason, len(raw), request_id=info.request_id)
            return json_response(b'{"detail":"invalid signature"}', 401)
        return await take_batch(raw, request, settings, store, metrics, recorder)


async def take_batch(
    raw: bytes,
    request: Request,
    settings: Settings,
    store: MessageStore,
    metrics: Metrics,
    recorder: RejectionRecorder,
) -> Response:
    """Parse, store and count a verified batch, a slice at a time."""
    scope = request.scope
    info = request_info(scope)
    try:
        batch = await parse_batch_in_slices(raw)
    except InvalidMessage as exc:
        metrics.whatsapp("invalid_payload")
        reason, field = validation_reason(exc)
        recorder.refuse(scope, PATH, reason, len(raw), field=field, request_id=info.request_id)
        return json_response(exc.to_json(), 422)

    outcomes = await store_all(store, batch.messages)
    created = outcomes.count(True)
    duplicate = outcomes.count(False)
    metrics.whatsapp_message("created", created)
    metrics.whatsapp_message("duplicate", duplicate)
    failures = [outcome for outcome in outcomes if isinstance(outcome, StorageUnavailable)]
    if failures:
        # Meta retries the whole batch; what was stored now comes back as duplicates.
        metrics.whatsapp("storage_unavailable")
        logger.warning(
            "write refused",
            extra={"request_id": info.request_id, "reason": str(failures[0]), "rows": created},
        )
        return unavailable(settings)

    # Counted once the batch is taken, so that a retried batch does not count them twice.
    record_skipped(batch, info.request_id, metrics)
    for index, (where, problem) in enumerate(batch.invalid, 1):
        recorder.refuse(
            scope,
            PATH,
            "invalid_field",
            len(raw),
            field=skipped_field(where, problem),
            request_id=info.request_id,
        )
        if index % SLICE == 0:
            await asyncio.sleep(0)
    for index, (message, outcome) in enumerate(zip(batch.messages, outcomes, strict=True), 1):
        if outcome is False:
            recorder.check_duplicate(scope, PATH, message, len(raw), info.request_id)
        if index % SLICE == 0:
            await asyncio.sleep(0)
    for status, count in Counter(batch.statuses).items():
        metrics.whatsapp_status(status, count)
    metrics.whatsapp("accepted")
    logger.info(
        "whatsapp batch",
        extra={
            "request_id": info.request_id,
            "stored": created,
            "duplicate": duplicate,
            "invalid": len(batch.invalid),
            "statuses": len(batch.statuses),
            "ignored_changes": batch.ignored_changes,
        },
    )
    return json_response(b'{"status":"ok"}')


def skipped_field(where: str, problem: str) -> str:
    """Where a skipped message's first problem is: `entry[0]...messages[2].from`.

    A problem reads `field: why` (InvalidPart names fields, never values)."""
    name, colon, _ = problem.partition(":")
    field = f"{where}.{name}" if colon and " " not in name else where
    return field[:FIELD_MAX]


def _content_length(value: str | None) -> bytes | None:
    return None if value is None or not value.isascii() else value.encode("ascii")


def record_skipped(batch: Batch, request_id: str, metrics: Metrics) -> None:
    metrics.whatsapp_message("invalid", len(batch.invalid))
    for where, reason in batch.invalid[:_MAX_LOGGED_PROBLEMS]:
        logger.warning(
            "whatsapp message skipped",
            extra={"request_id": request_id, "where": where, "reason": reason},
        )
    if len(batch.invalid) > _MAX_LOGGED_PROBLEMS:
        logger.warning(
            "whatsapp messages skipped",
            extra={"request_id": request_id, "more": len(batch.invalid) - _MAX_LOGGED_PROBLEMS},
        )
