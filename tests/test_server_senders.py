"""Real senders against a real uvicorn process, configured from the environment only."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from app.signature import sign
from tests.support.clients import encode, message
from tests.support.meta import (
    APP_SECRET,
    VERIFY_TOKEN,
    batch,
    change,
    hub_signature,
    meta_bytes,
    text_message,
)
from tests.support.servers import ROOT, running_server

pytestmark = pytest.mark.slow

WHSEC = "whsec_" + base64.b64encode(b"k" * 32).decode()
OLD = "the-old-secret"
READ_TOKEN = "read-token-0123456789abcdef"
METRICS_TOKEN = "metrics-token-0123456789abcdef"


def call(
    base_url: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    request = urllib.request.Request(  # noqa: S310 - loopback only
        base_url + path, data=body, method="POST" if body is not None else "GET"
    )
    # urllib would call a body form data otherwise.
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_every_sender_against_a_real_server(tmp_path: Path) -> None:
    env = {
        "WEBHOOK_SECRET": WHSEC,
        "WEBHOOK_SECRET_PREVIOUS": OLD,
        "WHATSAPP_APP_SECRET": APP_SECRET,
        "WHATSAPP_VERIFY_TOKEN": VERIFY_TOKEN,
        # A public endpoint: reads locked, as the service insists (docs/security.md).
        "READ_TOKENS": READ_TOKEN,
        "METRICS_TOKEN": METRICS_TOKEN,
    }
    with running_server(tmp_path, env=env) as server:
        url = server.base_url
        # A Standard Webhooks sender, with the whsec_ secret it was given.
        body = json.dumps(message(message_id="sw-1", text="héllo"), ensure_ascii=False)
        now = datetime.now(UTC)
        standard = {
            "Content-Type": "application/json",
            "webhook-id": "msg_1",
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(WHSEC).sign("msg_1", now, body),
        }
        assert call(url, "/webhook", body.encode(), standard)[0] == 200
        # A flat sender not yet moved off the previous secret, with the sha256= prefix.
        raw = encode(message(message_id="flat-1"))
        flat = {"X-Signature": "sha256=" + sign(raw, OLD.encode())}
        assert call(url, "/webhook", raw, flat)[0] == 200
        # Meta: the handshake, then a batch.
        query = f"?hub.mode=subscribe&hub.verify_token={VERIFY_TOKEN}&hub.challenge=424242"
        assert call(url, "/webhook/whatsapp" + query) == (200, b"424242")
        wa = meta_bytes(batch(change([text_message("wamid.1", body="¿qué tal?")])))
        signed = {"X-Hub-Signature-256": hub_signature(wa), "Content-Type": "application/json"}
        assert call(url, "/webhook/whatsapp", wa, signed) == (200, b'{"status":"ok"}')
        assert call(url, "/metrics")[0] == 401
        scrape = {"Authorization": f"Bearer {METRICS_TOKEN}"}
        metrics = call(url, "/metrics", headers=scrape)[1].decode()
        assert 'webhook_signature_key_total{key="current"} 1.0' in metrics
        assert 'webhook_signature_key_total{key="previous"} 1.0' in metrics
        assert 'whatsapp_messages_total{result="created"} 1.0' in metrics
        server.stop()
    with sqlite3.connect(tmp_path / "app.db") as conn:
        rows = conn.execute("SELECT message_id, text FROM messages ORDER BY 1").fetchall()
    assert rows == [("flat-1", "Hello"), ("sw-1", "héllo"), ("wamid.1", "¿qué tal?")]


def test_the_sign_command_prints_headers_that_verify(tmp_path: Path) -> None:
    body = encode(message(message_id="cli-1"))
    env = {"WEBHOOK_SECRET": WHSEC, "PATH": "/usr/bin:/bin"}
    printed = subprocess.run(
        [sys.executable, "-m", "app", "sign", "--standard-webhooks"],
        input=body,
        capture_output=True,
        cwd=ROOT,
        env=env,
        check=True,
        timeout=30,
    ).stdout.decode()
    headers = dict(line.split(": ", 1) for line in printed.splitlines())
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature"}
    with running_server(tmp_path, env={"WEBHOOK_SECRET": WHSEC}) as server:
        assert call(server.base_url, "/webhook", body, headers)[0] == 200
        headers["webhook-timestamp"] = str(int(headers["webhook-timestamp"]) - 1)
        assert call(server.base_url, "/webhook", body, headers) == (
            401,
            b'{"detail":"invalid signature"}',
        )
