"""POST /webhook: size limit, signature, content type, validation, exactly-once insert.

It is answered in front of FastAPI rather than by a FastAPI route: this is the hot path a
sender hammers, and FastAPI's routing and dependency machinery cost several times the
work done here (see the Performance section of docs/performance.md). Its OpenAPI entry is written
out below, so /docs still describes it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import Receive, Scope

from app.api.deps import (
    OVERLOADED,
    BodyBudgetSpent,
    BodyLease,
    ClientDisconnected,
    PayloadTooLarge,
    read_body,
)
from app.config import Settings
from app.metrics import Metrics
from app.middleware import DirectReply, RequestInfo, request_info
from app.models import InvalidMessage, Message, parse_message
from app.rejections import (
    SIGNATURE_REASONS,
    RejectionRecorder,
    declared_size,
    validation_reason,
)
from app.signature import InvalidSignature, Verifier
from app.storage import MessageStore, StorageUnavailable

logger = logging.getLogger("app.webhook")

PATH = "/webhook"
JSON = b"application/json"


def is_json_content_type(value: bytes | None) -> bool:
    if value is None:
        return True  # a sender that names no type is read as JSON
    media_type, _, params = value.partition(b";")
    if media_type.strip().lower() != JSON:
        return False
    for param in params.split(b";"):
        name, _, param_value = param.partition(b"=")
        charset = param_value.strip().strip(b'"').lower()
        if name.strip().lower() == b"charset" and charset not in (b"utf-8", b"utf8"):
            return False
    return True


class WebhookEndpoint:
    """POST /webhook, as a direct handler: it returns the whole response and the
    observability middleware sends it (see ObservabilityMiddleware)."""

    def __init__(self, settings: Settings, metrics: Metrics, recorder: RejectionRecorder) -> None:
        self.limit = settings.max_body_bytes
        self.verifier = Verifier(
            settings.secrets(),
            settings.standard_webhook_keys(),
            settings.webhook_tolerance_past_seconds,
            settings.webhook_tolerance_future_seconds,
        )
        self.retry_after = str(settings.retry_after_seconds).encode()
        self.metrics = metrics
        self.recorder = recorder

    async def __call__(self, scope: Scope, receive: Receive) -> DirectReply:
        if scope["method"] != "POST":
            return 405, b'{"detail":"Method Not Allowed"}', [(b"allow", b"POST")]
        # The body counts against the process's budget until the answer is decided.
        with BodyLease(scope["state"]["body_budget"]) as lease:
            return await self.handle(scope, receive, lease)

    async def handle(self, scope: Scope, receive: Receive, lease: BodyLease) -> DirectReply:
        info = request_info(scope)
        headers = dict(scope["headers"])
        try:
            raw = await read_body(receive, headers.get(b"content-length"), self.limit, lease)
        except PayloadTooLarge:
            self.outcome(info, "payload_too_large")
            size = declared_size(headers.get(b"content-length"), self.limit)
            self.recorder.refuse(scope, PATH, "body_too_large", size, request_id=info.request_id)
            # The rest of the body is never read, so the connection cannot be reused.
            return 413, b'{"detail":"payload too large"}', [(b"connection", b"close")]
        except BodyBudgetSpent:
            self.outcome(info, "overloaded")
            return (
                503,
                OVERLOADED,
                [(b"retry-after", self.retry_after), (b"connection", b"close")],
            )
        except ClientDisconnected:
            self.outcome(info, "client_disconnected")
            return 400, b'{"detail":"client disconnected"}', []

        try:
            key_index = self.verifier.verify(raw, scope["headers"], time.time())
        except InvalidSignature as exc:
            self.outcome(info, "invalid_signature")
            reason = SIGNATURE_REASONS[exc.reason]
            self.recorder.refuse(scope, PATH, reason, len(raw), request_id=info.request_id)
            return 401, b'{"detail":"invalid signature"}', []
        self.metrics.signature_key(key_index)

        if not is_json_content_type(headers.get(b"content-type")):
            self.outcome(info, "unsupported_media_type")
            self.recorder.refuse(
                scope, PATH, "unsupported_media_type", len(raw), request_id=info.request_id
            )
            return 415, b'{"detail":"content type must be application/json"}', []

        try:
            message = parse_message(raw)
        except InvalidMessage as exc:
            info.field = exc.first_field()
            self.outcome(info, "validation_error")
            reason, field = validation_reason(exc)
            self.recorder.refuse(
                scope, PATH, reason, len(raw), field=field, request_id=info.request_id
            )
            return 422, exc.to_json(), []

        info.message_id = message.message_id
        store: MessageStore = scope["state"]["store"]
        try:
            created = await store.insert(message)
        except StorageUnavailable as exc:
            self.outcome(info, "storage_unavailable")
            logger.warning(
                "write refused", extra={"request_id": info.request_id, "reason": str(exc)}
            )
            return (
                503,
                b'{"detail":"storage unavailable, retry later"}',
                [(b"retry-after", self.retry_after)],
            )
        info.dup = not created
        self.outcome(info, "created" if created else "duplicate")
        if not created:
            self.recorder.check_duplicate(scope, PATH, message, len(raw), info.request_id)
        return 200, b'{"status":"ok"}', []

    def outcome(self, info: RequestInfo, result: str) -> None:
        info.result = result
        self.metrics.webhook(result)


def openapi_operation() -> dict[str, Any]:
    """The OpenAPI description of POST /webhook (FastAPI does not see this route)."""
    error = {"content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "post": {
            "summary": "Receive one signed message",
            "operationId": "webhook",
            "description": (
                "Signed either with X-Signature, or with the three Standard Webhooks headers"
                " (any webhook-* header selects that scheme, and then all three are required)."
            ),
            "parameters": [
                {
                    "name": "X-Signature",
                    "in": "header",
                    "required": False,
                    "description": (
                        "Hex HMAC-SHA256 of the raw body, keyed with WEBHOOK_SECRET"
                        " (or WEBHOOK_SECRET_PREVIOUS), optionally prefixed sha256=."
                    ),
                    "schema": {"type": "string", "pattern": "^(sha256=)?[0-9a-fA-F]{64}$"},
                },
                {
                    "name": "webhook-id",
                    "in": "header",
                    "required": False,
                    "description": "Standard Webhooks: the delivery id (no dots).",
                    "schema": {"type": "string", "pattern": "^[\\x21-\\x2d\\x2f-\\x7e]{1,256}$"},
                },
                {
                    "name": "webhook-timestamp",
                    "in": "header",
                    "required": False,
                    "description": "Standard Webhooks: Unix seconds, within the tolerance window.",
                    "schema": {"type": "string", "pattern": "^(0|[1-9][0-9]{0,11})$"},
                },
                {
                    "name": "webhook-signature",
                    "in": "header",
                    "required": False,
                    "description": (
                        "Standard Webhooks: space-separated `v1,<base64 HMAC-SHA256 of"
                        " id.timestamp.body>` entries; other versions are skipped."
                    ),
                    "schema": {"type": "string"},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": Message.model_json_schema(by_alias=True)}
                },
            },
            "responses": {
                "200": {
                    "description": "Stored now, or already stored before",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"status": {"type": "string", "enum": ["ok"]}},
                                "required": ["status"],
                            }
                        }
                    },
                },
                "401": {"description": "Missing, malformed or wrong signature", **error},
                "413": {"description": "Body larger than MAX_BODY_BYTES", **error},
                "415": {"description": "Content-Type is not application/json", **error},
                "422": {"description": "Body is not a valid message", **error},
                "503": {
                    "description": "Storage cannot take the write now, or the server holds"
                    " too many request bodies at once; retry after Retry-After",
                    **error,
                },
            },
        }
    }
