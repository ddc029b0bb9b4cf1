"""The WhatsApp Cloud API endpoint: Meta's subscription handshake, and its signed batches.

Meta posts batches: a list of entries, each with a list of changes, each change's value
carrying messages and/or status updates. Every message of every entry and change becomes
one row of the messages table, idempotently (its `wamid` is the `message_id`); status
updates are counted. A malformed message is logged, counted and skipped, and the batch is
still acknowledged: Meta retries a failed batch for days, and a retry cannot fix it.

Not the hot path, so these are ordinary FastAPI routes; but the body is read raw, within a
size limit, and its signature checked before anything parses it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import PlainTextResponse
from pydantic import ValidationError

from app.api.deps import (
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
from app.metrics import Metrics
from app.middleware import request_info
from app.models import InvalidMessage, Message, read_json
from app.rejections import FIELD_MAX, SIGNATURE_REASONS, declared_size, validation_reason
from app.signature import MALFORMED, InvalidSignature, verify_hub_signature
from app.storage import MessageStore, StorageUnavailable

logger = logging.getLogger("app.whatsapp")

router = APIRouter(tags=["whatsapp"])

PATH = "/webhook/whatsapp"
# Meta's challenge is a number; anything else is not echoed into a response body.
_CHALLENGE = re.compile(r"[0-9A-Za-z_-]{1,256}")
# Unix seconds up to year 5138: generous, and small enough for any datetime.
_UNIX_SECONDS = re.compile(r"[0-9]{1,11}")
# Where Meta keeps what becomes each of our fields, for messages that say what is wrong.
_META_FIELDS = {
    "message_id": "id",
    "from": "from",
    "to": "metadata.display_phone_number",
    "ts": "timestamp",
    "text": "text.body",
}
# Per batch; past it, one line says how many more were skipped.
_MAX_LOGGED_PROBLEMS = 20


class InvalidPart(ValueError):
    """One message, or one part of a batch, cannot be read. Names fields, never values."""


@dataclass
class Batch:
    """What one delivery holds: the messages to store, what was skipped, the statuses."""

    messages: list[Message] = field(default_factory=list)
    # (where in the batch, why), e.g. ("entry[0].changes[1].value.messages[2]", "from: ...")
    invalid: list[tuple[str, str]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    ignored_changes: int = 0


def parse_batch(body: bytes) -> Batch:
    """Read a verified body; raise InvalidMessage only if it is not a batch at all."""
    payload = read_json(body)
    if not isinstance(payload, dict):
        raise InvalidMessage([{"loc": ["body"], "msg": "must be an object", "type": "dict_type"}])
    entries = payload.get("entry")
    if not isinstance(entries, list):
        raise InvalidMessage(
            [{"loc": ["body", "entry"], "msg": "must be a list of entries", "type": "list_type"}]
        )
    batch = Batch()
    for e, entry in enumerate(entries):
        where = f"entry[{e}]"
        changes = entry.get("changes") if isinstance(entry, dict) else None
        if not isinstance(changes, list):
            batch.invalid.append((where, "must be an object with a list of changes"))
            continue
        for c, change in enumerate(changes):
            here = f"{where}.changes[{c}]"
            value = change.get("value") if isinstance(change, dict) else None
            if not isinstance(value, dict):
                batch.invalid.append((here, "must be an object with an object value"))
            elif change.get("field") != "messages":
                # Other subscriptions (templates, account updates) carry no messages.
                batch.ignored_changes += 1
            else:
                read_value(value, f"{here}.value", batch)
    return batch


def read_value(value: dict[str, Any], where: str, batch: Batch) -> None:
    """The messages and statuses of one change's value, into `batch`."""
    messages = value.get("messages", [])
    statuses = value.get("statuses", [])
    if not isinstance(messages, list):
        batch.invalid.append((f"{where}.messages", "must be a list"))
        messages = []
    if not isinstance(statuses, list):
        batch.invalid.append((f"{where}.statuses", "must be a list"))
        statuses = []
    to = business_number(value.get("metadata"))
    for m, item in enumerate(messages):
        try:
            batch.messages.append(to_message(item, to))
        except InvalidPart as exc:
            batch.invalid.append((f"{where}.messages[{m}]", str(exc)))
    for status in statuses:
        state = status.get("status") if isinstance(status, dict) else None
        batch.statuses.append(state if isinstance(state, str) else "other")


def business_number(metadata: object) -> str | None:
    """`+` and the display number the messages were sent to, if the metadata has one."""
    if not isinstance(metadata, dict):
        return None
    number = metadata.get("display_phone_number")
    if not isinstance(number, str):
        return None
    # Meta sends bare digits; a leading '+' is tolerated, not doubled.
    return "+" + number.removeprefix("+")


def to_message(item: object, to: str | None) -> Message:
    """One of Meta's messages as ours; raises InvalidPart naming what is wrong."""
    if not isinstance(item, dict):
        raise InvalidPart("must be an object")
    if to is None:
        raise InvalidPart("metadata.display_phone_number: missing")
    sender = item.get("from")
    if not isinstance(sender, str):
        raise InvalidPart("from: must be a string")
    kind = item.get("type")
    if not isinstance(kind, str):
        raise InvalidPart("type: must be a string")
    text = None
    if kind == "text":
        body = item.get("text")
        text = body.get("body") if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise InvalidPart("text.body: must be a string in a text message")
    fields = {
        "message_id": item.get("id"),
        "from": "+" + sender,
        "to": to,
        "ts": unix_to_instant(item.get("timestamp")),
        "text": text,
    }
    try:
        return Message.model_validate(fields)
    except ValidationError as exc:
        problems = [
            f"{_META_FIELDS.get(str(error['loc'][0]), error['loc'][0])}: {error['msg']}"
            if error["loc"]
            else error["msg"]
            for error in exc.errors(include_input=False, include_url=False, include_context=False)
        ]
        raise InvalidPart("; ".join(problems)) from None


def unix_to_instant(value: object) -> str:
    """Meta's Unix-seconds timestamp (a string of digits) as `YYYY-MM-DDTHH:MM:SSZ`."""
    if isinstance(value, str) and _UNIX_SECONDS.fullmatch(value):
        seconds = int(value)
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**11:
        seconds = value
    else:
        raise InvalidPart("timestamp: must be Unix seconds")
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def store_all(store: MessageStore, messages: list[Message]) -> list[bool | BaseException]:
    # Concurrently, so that the store's group commit writes the batch in one transaction.
    return await asyncio.gather(*(store.insert(m) for m in messages), return_exceptions=True)


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
    try:
        raw = await read_body(request.receive, declared, settings.whatsapp_max_body_bytes)
    except PayloadTooLarge:
        metrics.whatsapp("payload_too_large")
        size = declared_size(declared, settings.whatsapp_max_body_bytes)
        recorder.refuse(scope, PATH, "body_too_large", size, request_id=info.request_id)
        # The rest of the body is never read, so the connection cannot be reused.
        return json_response(
            b'{"detail":"payload too large"}', 413, headers={"connection": "close"}
        )
    except ClientDisconnected:
        metrics.whatsapp("client_disconnected")
        return json_response(b'{"detail":"client disconnected"}', 400)

    signatures = request.headers.getlist("x-hub-signature-256")
    try:
        if len(signatures) > 1:
            raise InvalidSignature(MALFORMED)
        verify_hub_signature(
            raw, signatures[0] if signatures else None, [secret.get_secret_value().encode()]
        )
    except InvalidSignature as exc:
        metrics.whatsapp("invalid_signature")
        reason = SIGNATURE_REASONS[exc.reason]
        recorder.refuse(scope, PATH, reason, len(raw), request_id=info.request_id)
        return json_response(b'{"detail":"invalid signature"}', 401)

    try:
        batch = parse_batch(raw)
    except InvalidMessage as exc:
        metrics.whatsapp("invalid_payload")
        reason, field = validation_reason(exc)
        recorder.refuse(scope, PATH, reason, len(raw), field=field, request_id=info.request_id)
        return json_response(exc.to_json(), 422)

    outcomes = await store_all(store, batch.messages)
    created = sum(1 for outcome in outcomes if outcome is True)
    duplicate = sum(1 for outcome in outcomes if outcome is False)
    metrics.whatsapp_message("created", created)
    metrics.whatsapp_message("duplicate", duplicate)
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    for failure in failures:
        if not isinstance(failure, StorageUnavailable):
            raise failure
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
    for where, problem in batch.invalid:
        recorder.refuse(
            scope,
            PATH,
            "invalid_field",
            len(raw),
            field=skipped_field(where, problem),
            request_id=info.request_id,
        )
    for message, outcome in zip(batch.messages, outcomes, strict=True):
        if outcome is False:
            recorder.check_duplicate(scope, PATH, message, len(raw), info.request_id)
    for status in batch.statuses:
        metrics.whatsapp_status(status)
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
