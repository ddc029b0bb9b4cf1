"""What most tests build on: settings, a message, and a test client with helpers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx2 as httpx
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.config import Settings
from app.signature import sign
from app.storage import PostgresStore, SQLiteStore
from app.storage.rows import Row

SECRET = "testsecret"


def make_settings(database_url: str = "sqlite:///:memory:", **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "webhook_secret": SecretStr(SECRET),
        "database_url": database_url,
        "log_level": "INFO",
        **overrides,
    }
    return Settings(**values)


def message(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "message_id": "m1",
        "from": "+919876543210",
        "to": "+14155550100",
        "ts": "2025-01-15T10:00:00Z",
        "text": "Hello",
    }
    body.update(overrides)
    return body


def encode(body: dict[str, Any] | bytes) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


class AppClient(TestClient):
    """A TestClient with the few helpers every test wants.

    It names the host `localhost`, as a browser or curl on the same machine would:
    TestClient's own `testserver` is not in the default ALLOWED_HOSTS.
    """

    # A read token for the helpers' own reads (metric), when the app has READ_TOKENS.
    read_token: str | None = None

    def __init__(self, app: Any, base_url: str = "http://localhost", **kwargs: Any) -> None:
        super().__init__(app, base_url=base_url, **kwargs)

    def post_signed(
        self,
        body: dict[str, Any] | bytes,
        *,
        secret: str = SECRET,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        raw = encode(body)
        sent = {"Content-Type": "application/json", "X-Signature": sign(raw, secret.encode())}
        sent.update(headers or {})
        return self.post("/webhook", content=raw, headers=sent)

    @property
    def store(self) -> SQLiteStore | PostgresStore:
        store: SQLiteStore | PostgresStore = self.app_state["store"]
        return store

    @property
    def sqlite_store(self) -> SQLiteStore:
        store = self.store
        assert isinstance(store, SQLiteStore)
        return store

    def rows(self, sql: str = "SELECT message_id FROM messages ORDER BY message_id") -> list[Row]:
        assert self.portal is not None
        return self.portal.call(self.store.query, sql)

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample in /metrics (0.0 if the line is absent)."""
        wanted = name
        if labels:
            wanted += "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        headers = {} if self.read_token is None else {"Authorization": f"Bearer {self.read_token}"}
        for line in self.get("/metrics", headers=headers).text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


MakeClient = Callable[..., AppClient]


def json_lines(captured: str) -> list[dict[str, Any]]:
    """Every non-empty line of captured output, parsed as JSON (and at least one)."""
    parsed = [json.loads(line) for line in captured.splitlines() if line.strip()]
    assert parsed
    return parsed
