from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from _pytest.terminal import TerminalReporter
from fastapi.testclient import TestClient
from pydantic import SecretStr

from app.config import Settings
from app.logging_utils import flush_logs
from app.main import create_app
from app.postgres_store import PostgresStore
from app.signature import sign
from app.storage import Row, SQLiteStore
from tests.postgres import PostgresCluster, running_cluster, why_unavailable
from tests.tiers import FIGURES, TIER

SECRET = "testsecret"

# The test client logs every request it makes (URL and query included) at INFO; those
# lines are the client's, not the service's, and would muddle the log assertions.
logging.getLogger("httpx2").setLevel(logging.WARNING)


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


class Client(TestClient):
    """A TestClient with the few helpers every test wants."""

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
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


AppClient = Callable[..., Client]


@pytest.fixture
def capsys(capsys: pytest.CaptureFixture[str]) -> pytest.CaptureFixture[str]:
    """pytest's capsys, with the JSON handler's waiting INFO lines written out before
    every read: the service holds them up to FLUSH_SECONDS (see app.logging_utils)."""
    read = capsys.readouterr

    def flushed_read() -> Any:
        flush_logs()
        return read()

    setattr(capsys, "readouterr", flushed_read)  # noqa: B010 - mypy: a method is read-only
    return capsys


@pytest.fixture
def make_client() -> Iterator[AppClient]:
    """Builds a client on a fresh app; the lifespan runs and is closed after the test."""
    clients: list[Client] = []

    def build(settings: Settings | None = None, **overrides: Any) -> Client:
        client = Client(create_app(settings or make_settings(**overrides)))
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of our own for the whole session, removed after it."""
    reason = why_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each backend in turn: SQLite in memory, and an emptied PostgreSQL database."""
    if request.param == "sqlite":
        return "sqlite:///:memory:"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.clean_database()


@pytest.fixture
def client(make_client: AppClient, database_url: str) -> Client:
    """The app on a fresh database of each backend (SQLite :memory:, as the brief asks)."""
    return make_client(database_url=database_url)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "app.db"


@pytest.fixture
def file_client(make_client: AppClient, db_path: Path) -> Client:
    """The app on a SQLite file, for what only a file has (WAL, readers, probes)."""
    return make_client(database_url=f"sqlite:///{db_path}")


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section(f"reliability figures ({TIER.name} tier)")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
