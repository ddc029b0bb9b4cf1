"""Fixtures only; the helpers they build on live in tests/support/."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _pytest.terminal import TerminalReporter

from app.config import Settings
from app.logging_utils import flush_logs
from app.main import create_app
from tests.support.clients import AppClient, MakeClient, make_settings
from tests.support.postgres import PostgresCluster, running_cluster, why_unavailable
from tests.support.tiers import FIGURES, TIER

# The test client logs every request it makes (URL and query included) at INFO; those
# lines are the client's, not the service's, and would muddle the log assertions.
logging.getLogger("httpx2").setLevel(logging.WARNING)


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
def make_client() -> Iterator[MakeClient]:
    """Builds a client on a fresh app; the lifespan runs and is closed after the test."""
    clients: list[AppClient] = []

    def build(settings: Settings | None = None, **overrides: Any) -> AppClient:
        client = AppClient(create_app(settings or make_settings(**overrides)))
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
def client(make_client: MakeClient, database_url: str) -> AppClient:
    """The app on a fresh database of each backend (SQLite :memory:, as the brief asks)."""
    return make_client(database_url=database_url)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "app.db"


@pytest.fixture
def file_client(make_client: MakeClient, db_path: Path) -> AppClient:
    """The app on a SQLite file, for what only a file has (WAL, readers, probes)."""
    return make_client(database_url=f"sqlite:///{db_path}")


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section(f"reliability figures ({TIER.name} tier)")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
