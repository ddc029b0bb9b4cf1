"""Shared parts of the reliability battery: signed bodies and small HTTP clients."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any

from app.signature import sign
from tests.conftest import SECRET, message


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


class Client:
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

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def raw_exchange(base_url: str, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes on a fresh connection; everything read until the server closes or waits."""
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
                if _complete_response(b"".join(chunks)):
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
