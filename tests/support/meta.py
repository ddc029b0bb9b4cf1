"""Payloads in the shape Meta's WhatsApp Cloud API documents, and how Meta signs them."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

APP_SECRET = "meta-app-secret"
VERIFY_TOKEN = "a-verify-token"
PATH = "/webhook/whatsapp"
BUSINESS = "15550783881"
ROWS = "SELECT message_id, from_msisdn, to_msisdn, ts, text FROM messages ORDER BY message_id"


def text_message(wamid: str, sender: str = "16315551234", body: str = "Hello") -> dict[str, Any]:
    return {
        "from": sender,
        "id": wamid,
        "timestamp": "1603059201",
        "text": {"body": body},
        "type": "text",
    }


def image_message(wamid: str) -> dict[str, Any]:
    return {
        "from": "16315551234",
        "id": wamid,
        "timestamp": "1603059202",
        "type": "image",
        "image": {
            "caption": "a caption is not text",
            "mime_type": "image/jpeg",
            "sha256": "81d3bd8a8db4868c9520ed47186e8b7c5789e61ff79f7f834be6950b808a90d3",
            "id": "2754859441498128",
        },
    }


def status(wamid: str, state: str) -> dict[str, Any]:
    return {
        "id": wamid,
        "status": state,
        "timestamp": "1750857384",
        "recipient_id": "5516992318222",
        "conversation": {"id": "a75d17ad06104c51166f948319b03c6a", "origin": {"type": "service"}},
        "pricing": {"billable": True, "pricing_model": "CBP", "category": "service"},
    }


def change(
    messages: list[Any] | None = None,
    statuses: list[Any] | None = None,
    display: str = BUSINESS,
    field: str = "messages",
) -> dict[str, Any]:
    value: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": display, "phone_number_id": "106540352242922"},
    }
    if messages is not None:
        value["contacts"] = [{"profile": {"name": "Kerry Fisher"}, "wa_id": "16315551234"}]
        value["messages"] = messages
    if statuses is not None:
        value["statuses"] = statuses
    return {"value": value, "field": field}


def batch(*changes: dict[str, Any], entries: int = 1) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [{"id": f"10245607{n}", "changes": list(changes)} for n in range(entries)],
    }


def meta_bytes(payload: dict[str, Any]) -> bytes:
    # Meta escapes every non-ASCII character (and '/') in what it sends and signs.
    return json.dumps(payload, separators=(",", ":")).replace("/", "\\/").encode()


def hub_signature(raw: bytes, secret: str = APP_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
