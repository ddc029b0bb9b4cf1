"""What the sender schemes cost: the signature step alone, and WhatsApp batches end to end.

    .venv/bin/python -m bench.senders

Prints medians. The signature step is timed in-process (X-Signature against Standard
Webhooks, on a typical header list); the batches go to a real uvicorn process on a
loopback port with a SQLite file, one batch at a time, so the figure is per-batch latency.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import statistics
import tempfile
import time
import timeit
import urllib.request
from pathlib import Path

from app.signature import Verifier, sign, sign_standard_webhook
from tests.support.servers import running_server

BODY = (
    b'{"message_id":"m1","from":"+919876543210","to":"+14155550100",'
    b'"ts":"2025-01-15T10:00:00Z","text":"Hello"}'
)
KEY = b"testsecret"
APP_SECRET = "bench-app-secret"


def signature_step() -> None:
    now = int(time.time())
    common = [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", b"bench"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(BODY)).encode()),
    ]
    flat = [*common, (b"x-signature", sign(BODY, KEY).encode())]
    standard = [
        *common,
        (b"webhook-id", b"msg_1"),
        (b"webhook-timestamp", str(now).encode()),
        (b"webhook-signature", sign_standard_webhook("msg_1", now, BODY, KEY).encode()),
    ]
    verifier = Verifier((KEY, b"previous"), (KEY, b"previous"))
    for name, headers in [("X-Signature", flat), ("Standard Webhooks", standard)]:

        def verify(h: list[tuple[bytes, bytes]] = headers) -> None:
            verifier.verify(BODY, h, now)

        runs = [min(timeit.repeat(verify, number=5000)) / 5000 * 1e6 for _ in range(7)]
        print(f"signature step, {name}, two keys: median {statistics.median(runs):.2f} us")


def whatsapp_batches(size: int, rounds: int = 30) -> None:
    env = {"WHATSAPP_APP_SECRET": APP_SECRET, "WHATSAPP_VERIFY_TOKEN": "bench"}
    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp), env=env) as server:
        latencies = []
        for round_ in range(rounds):
            messages = [
                {
                    "from": "16315551234",
                    "id": f"wamid.{round_}.{n}",
                    "timestamp": "1603059201",
                    "type": "text",
                    "text": {"body": f"message {n}"},
                }
                for n in range(size)
            ]
            value = {"metadata": {"display_phone_number": "15550783881"}, "messages": messages}
            payload = {"entry": [{"id": "1", "changes": [{"field": "messages", "value": value}]}]}
            raw = json.dumps(payload).encode()
            digest = hmac.new(APP_SECRET.encode(), raw, hashlib.sha256).hexdigest()
            request = urllib.request.Request(  # noqa: S310 - loopback only
                server.base_url + "/webhook/whatsapp",
                data=raw,
                headers={
                    "Content-Type": "application/json",
                    "X-Hub-Signature-256": "sha256=" + digest,
                },
            )
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                assert response.status == 200
            latencies.append((time.perf_counter() - started) * 1000)
        median = statistics.median(latencies)
        print(
            f"whatsapp batch of {size}: median {median:.1f} ms"
            f" ({median * 1000 / size:.0f} us per message)"
        )


if __name__ == "__main__":
    signature_step()
    for size in (1, 10, 100):
        whatsapp_batches(size)
