"""Shared parts of the reliability battery: signed bodies, HTTP clients, senders under load."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.signature import sign
from tests.support.clients import SECRET, message


def signed(message_id: str, **fields: Any) -> tuple[bytes, str]:
    body = json.dumps(message(message_id=message_id, **fields)).encode()
    return body, sign(body, SECRET.encode())


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def host_port(base_url: str) -> tuple[str, int]:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


class Connection:
    """One keep-alive connection; reconnects after any failure."""

    def __init__(self, base_url: str, timeout: float = 15) -> None:
        self.host, self.port = host_port(base_url)
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            self.conn.request(method, path, body=body, headers=headers or {})
            response = self.conn.getresponse()
            data = response.read()
        except BaseException:
            self.close()
            raise
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        if reply.headers.get("connection") == "close":
            self.close()
        return reply

    def post_webhook(self, body: bytes, signature: str) -> Reply:
        return self.request(
            "POST",
            "/webhook",
            body,
            {"Content-Type": "application/json", "X-Signature": signature},
        )

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def raw_exchange(
    base_url: str, data: bytes, timeout: float = 10, *, until_close: bool = False
) -> bytes:
    """Send raw bytes on a fresh connection; read one response, or all until the server closes."""
    with socket.create_connection(host_port(base_url), timeout=timeout) as sock:
        # The server may close as soon as it has seen enough: read its answer all the same.
        with contextlib.suppress(OSError):
            sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not until_close and _complete_response(b"".join(chunks)):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def _complete_response(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return False


def status_of(raw: bytes) -> int | None:
    """The status code of a raw HTTP/1.1 response, or None if there was none."""
    if not raw.startswith(b"HTTP/1."):
        return None
    return int(raw.split(b" ", 2)[1])


SENDERS = 6


@dataclass
class Ledger:
    """What the senders know: per id, acknowledged, refused, or unknown."""

    acked: set[str] = field(default_factory=set)
    # Sent, and the connection failed before an answer: stored or not, nobody knows.
    unknown: set[str] = field(default_factory=set)
    # Answered, but not with 200 (a 503 while the store was closing, say).
    refused: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, message_id: str, status: int | None) -> None:
        with self.lock:
            if status == 200:
                self.acked.add(message_id)
            elif status is None:
                self.unknown.add(message_id)
            else:
                self.refused.add(message_id)


class Senders:
    """Threads that deliver fresh signed messages to whichever server is up."""

    def __init__(self, ledger: Ledger, prefix: str) -> None:
        self.ledger = ledger
        self.ids = (f"{prefix}-{n}" for n in itertools.count())
        self.ids_lock = threading.Lock()
        self.base_url = ""
        self.up = threading.Event()
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(SENDERS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.done.set()
        self.up.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def run(self) -> None:
        client: Connection | None = None
        url = ""
        while not self.done.is_set():
            self.up.wait()
            if self.done.is_set():
                break
            if client is None or url != self.base_url:
                if client is not None:
                    client.close()
                url = self.base_url
                client = Connection(url, timeout=10)
            with self.ids_lock:
                message_id = next(self.ids)
            body, signature = signed(message_id, text=f"load {message_id}")
            try:
                status: int | None = client.post_webhook(body, signature).status
            except ConnectionRefusedError:
                time.sleep(0.01)
                continue  # nothing was sent: this id is simply never used
            except (OSError, http.client.HTTPException):
                status = None  # sent, perhaps stored, never answered
                time.sleep(0.01)
            self.ledger.note(message_id, status)
        if client is not None:
            client.close()


SCRAPE_ID = "metrics-scrape"


def scrape(base_url: str, log_path: Path) -> dict[str, float]:
    """/metrics as {'name{labels}': value}, scraped with a request id its access line shows.

    Returns once that line is in the log, so the log holds every request the scrape counted.
    """
    with Connection(base_url) as client:
        reply = client.request("GET", "/metrics", headers={"X-Request-ID": SCRAPE_ID})
    assert reply.status == 200
    for _ in range(100):
        if SCRAPE_ID in log_path.read_text(encoding="utf-8"):
            break
        time.sleep(0.05)
    samples = {}
    for line in reply.body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def metrics_disagreements(samples: dict[str, float], log_lines: list[str], rows: int) -> list[str]:
    """Where /metrics disagrees with the access lines logged before the scrape, or the rows."""
    access = [json.loads(line) for line in log_lines]
    access = [line for line in access if line.get("logger") == "app.access"]
    access = access[: [line["request_id"] for line in access].index(SCRAPE_ID)]
    found = []

    def check(what: str, metric: float, expected: float) -> None:
        if metric != expected:
            found.append(f"{what}: metrics say {metric}, expected {expected}")

    by_status: dict[str, float] = {}
    for name, value in samples.items():
        if name.startswith("http_requests_total{"):
            status = name.split('status="', 1)[1].split('"', 1)[0]
            by_status[status] = by_status.get(status, 0) + value
    for status in {str(line["status"]) for line in access} | set(by_status):
        logged = sum(1 for line in access if str(line["status"]) == status)
        check(f"requests with status {status}", by_status.get(status, 0), logged)
    check("latency observations", samples["request_latency_ms_count"], len(access))
    for name, value in samples.items():
        if name.startswith(("webhook_requests_total{", "access_refusals_total{")):
            result = name.split('="', 1)[1].split('"', 1)[0]
            check(f"outcome {result}", value, sum(1 for x in access if x.get("result") == result))
    check("rows stored", samples['webhook_requests_total{result="created"}'], rows)
    return found
