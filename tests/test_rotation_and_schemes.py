"""POST /webhook with a rotated secret, the sha256= prefix, and Standard Webhooks headers."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime
from typing import Any

import httpx2 as httpx
import pytest
from standardwebhooks.webhooks import Webhook

from app.signature import sign, sign_standard_webhook
from tests.support.clients import SECRET, AppClient, MakeClient, encode, message

OLD = "the-old-secret"
WHSEC_KEY = bytes(range(32))
WHSEC = "whsec_" + base64.b64encode(WHSEC_KEY).decode()
UNAUTHORISED = {"detail": "invalid signature"}


def post_standard(
    client: AppClient,
    body: dict[str, Any] | bytes,
    *,
    key: bytes = SECRET.encode(),
    webhook_id: str = "msg_1",
    timestamp: int | None = None,
    signature: str | None = None,
    extra: dict[str, str] | None = None,
) -> httpx.Response:
    raw = encode(body)
    sent_at = int(time.time()) if timestamp is None else timestamp
    headers = {
        "Content-Type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(sent_at),
        "webhook-signature": signature or sign_standard_webhook(webhook_id, sent_at, raw, key),
        **(extra or {}),
    }
    return client.post("/webhook", content=raw, headers=headers)


def keys_used(client: AppClient) -> tuple[float, float]:
    return (
        client.metric("webhook_signature_key_total", key="current"),
        client.metric("webhook_signature_key_total", key="previous"),
    )


# Rotation


def test_both_keys_are_accepted_during_a_rotation_and_counted_apart(
    make_client: MakeClient,
) -> None:
    client = make_client(webhook_secret_previous=OLD)
    assert client.post_signed(message(message_id="new"), secret=SECRET).status_code == 200
    assert client.post_signed(message(message_id="old1"), secret=OLD).status_code == 200
    assert client.post_signed(message(message_id="old2"), secret=OLD).status_code == 200
    assert client.post_signed(message(message_id="bad"), secret="neither").status_code == 401
    assert keys_used(client) == (1, 2)
    assert client.rows() == [("new",), ("old1",), ("old2",)]


def test_after_the_rotation_the_old_key_is_refused(make_client: MakeClient) -> None:
    client = make_client()  # WEBHOOK_SECRET_PREVIOUS unset again
    response = client.post_signed(message(), secret=OLD)
    assert response.status_code == 401
    assert response.json() == UNAUTHORISED
    assert keys_used(client) == (0, 0)


def test_every_key_line_exists_from_start_up(client: AppClient) -> None:
    text = client.get("/metrics").text
    assert 'webhook_signature_key_total{key="current"} 0.0' in text
    assert 'webhook_signature_key_total{key="previous"} 0.0' in text


def test_a_rejected_signature_counts_no_key(make_client: MakeClient) -> None:
    client = make_client(webhook_secret_previous=OLD)
    client.post_signed(message(), secret="neither")
    client.post_signed(message(ts="yesterday"))  # verified, then refused by validation
    assert keys_used(client) == (1, 0)


# The sha256= prefix


def test_x_signature_may_carry_the_sha256_prefix(make_client: MakeClient) -> None:
    client = make_client(webhook_secret_previous=OLD)
    for secret, message_id in [(SECRET, "m1"), (OLD, "m2")]:
        raw = encode(message(message_id=message_id))
        response = client.post(
            "/webhook",
            content=raw,
            headers={"X-Signature": "sha256=" + sign(raw, secret.encode()).upper()},
        )
        assert response.status_code == 200
    assert client.rows() == [("m1",), ("m2",)]
    assert keys_used(client) == (1, 1)


@pytest.mark.parametrize("prefix", ["SHA256=", "sha256 ", "sha1=", "sha256=sha256="])
def test_other_prefixes_are_401(client: AppClient, prefix: str) -> None:
    raw = encode(message())
    response = client.post(
        "/webhook", content=raw, headers={"X-Signature": prefix + sign(raw, SECRET.encode())}
    )
    assert response.status_code == 401
    assert response.json() == UNAUTHORISED
    assert client.rows() == []


# Standard Webhooks


def test_a_standard_webhooks_delivery_is_stored(client: AppClient) -> None:
    response = post_standard(client, message())
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert client.rows("SELECT message_id, text FROM messages") == [("m1", "Hello")]
    assert keys_used(client) == (1, 0)


def test_a_delivery_signed_by_the_standardwebhooks_package_is_stored(
    make_client: MakeClient,
) -> None:
    client = make_client(webhook_secret=WHSEC)
    # The package signs text; the body is sent as exactly those UTF-8 bytes.
    body = json.dumps(message(text="Grüße aus Köln, 你好"), ensure_ascii=False)
    now = datetime.now(UTC)
    headers = {
        "webhook-id": "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(WHSEC).sign("msg_2KWPBgLlAfxdpx2AI54pPJ85f4W", now, body),
    }
    response = client.post("/webhook", content=body.encode(), headers=headers)
    assert response.status_code == 200
    assert client.rows("SELECT text FROM messages") == [("Grüße aus Köln, 你好",)]


def test_a_whsec_secret_keys_standard_webhooks_with_its_decoded_bytes(
    make_client: MakeClient,
) -> None:
    client = make_client(webhook_secret=WHSEC)
    assert post_standard(client, message(message_id="a"), key=WHSEC_KEY).status_code == 200
    # Signing with the literal "whsec_..." text is not what a Standard Webhooks sender does.
    literal = post_standard(client, message(message_id="b"), key=WHSEC.encode())
    assert literal.status_code == 401
    # X-Signature keeps using the secret exactly as configured.
    assert client.post_signed(message(message_id="c"), secret=WHSEC).status_code == 200
    assert client.rows() == [("a",), ("c",)]


def test_standard_webhooks_with_the_previous_key_is_counted_as_previous(
    make_client: MakeClient,
) -> None:
    client = make_client(webhook_secret_previous=OLD)
    assert post_standard(client, message(message_id="a"), key=OLD.encode()).status_code == 200
    # A sender in the middle of its own rotation signs with both.
    raw = encode(message(message_id="b"))
    now = int(time.time())
    both = " ".join(
        sign_standard_webhook("msg_2", now, raw, key) for key in (b"unknown-new", OLD.encode())
    )
    response = post_standard(client, raw, webhook_id="msg_2", timestamp=now, signature=both)
    assert response.status_code == 200
    assert keys_used(client) == (0, 2)


def test_standard_webhooks_timestamps_outside_the_window_are_401(client: AppClient) -> None:
    now = int(time.time())
    for offset in (-3600, -400, 400, 3600):
        response = post_standard(client, message(), timestamp=now + offset)
        assert response.status_code == 401, offset
        assert response.json() == UNAUTHORISED
    assert client.rows() == []
    assert client.metric("webhook_requests_total", result="invalid_signature") == 4


def test_the_window_is_configurable(make_client: MakeClient) -> None:
    client = make_client(webhook_tolerance_past_seconds=7200, webhook_tolerance_future_seconds=1)
    now = int(time.time())
    assert post_standard(client, message(message_id="old"), timestamp=now - 3600).status_code == 200
    assert post_standard(client, message(message_id="new"), timestamp=now + 120).status_code == 401
    assert client.rows() == [("old",)]


@pytest.mark.parametrize(
    "broken",
    [
        {"webhook-id": "msg.1"},
        {"webhook-id": ""},
        {"webhook-timestamp": "1.5"},
        {"webhook-timestamp": "soon"},
        {"webhook-signature": "v1,not-base64!"},
        {"webhook-signature": "v1,"},
        {"webhook-signature": "v1a,c2lnbmF0dXJl"},
        {"webhook-signature": "v2,c2lnbmF0dXJl"},
    ],
)
def test_malformed_standard_webhooks_headers_are_401_with_the_same_body(
    client: AppClient, broken: dict[str, str]
) -> None:
    response = post_standard(client, message(), extra=broken)
    assert response.status_code == 401
    assert response.json() == UNAUTHORISED
    assert client.rows() == []


@pytest.mark.parametrize("dropped", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_an_incomplete_standard_webhooks_set_is_401_even_with_x_signature(
    client: AppClient, dropped: str
) -> None:
    raw = encode(message())
    now = int(time.time())
    headers = {
        "X-Signature": sign(raw, SECRET.encode()),
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": sign_standard_webhook("msg_1", now, raw, SECRET.encode()),
    }
    del headers[dropped]
    response = client.post("/webhook", content=raw, headers=headers)
    assert response.status_code == 401
    assert response.json() == UNAUTHORISED


def test_a_replayed_delivery_inside_the_window_stores_one_row(client: AppClient) -> None:
    raw = encode(message())
    now = int(time.time())
    signature = sign_standard_webhook("msg_1", now, raw, SECRET.encode())
    for _ in range(3):
        response = post_standard(client, raw, timestamp=now, signature=signature)
        assert response.status_code == 200
    assert client.rows() == [("m1",)]
    assert client.metric("webhook_requests_total", result="duplicate") == 2


def test_standard_webhooks_failures_look_like_x_signature_failures(client: AppClient) -> None:
    bodies = {
        post_standard(client, message(), key=b"wrong").content,
        post_standard(client, message(), timestamp=0).content,
        post_standard(client, message(), extra={"webhook-id": "a.b"}).content,
        client.post_signed(message(), secret="wrong").content,
        client.post("/webhook", content=encode(message())).content,
    }
    assert bodies == {b'{"detail":"invalid signature"}'}
