"""Reaching PostgreSQL: TLS (sslmode) on every connection, and the connection budget.

A cluster of its own, with ssl = on and a self-signed certificate, a small
max_connections and every connection logged: the shared one is left as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from app.api.probes import READY_TIMEOUT_SECONDS
from app.storage import StorageUnavailable
from app.storage.postgres.budget import ServerLimits, budget_refusal
from tests.support.clients import MakeClient, message
from tests.support.postgres import (
    PASSWORD,
    PostgresCluster,
    database_name,
    running_cluster,
    why_unavailable,
)
from tests.support.servers import SERVE, run_module, running_server

pytestmark = pytest.mark.postgres

MAX_CONNECTIONS = 20
# What a non-superuser may hold: max_connections - superuser_reserved_connections (3).
ALLOWED = MAX_CONNECTIONS - 3
SYSTEM_CAS = "/etc/ssl/certs/ca-certificates.crt"


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[PostgresCluster]:
    reason = why_unavailable() or (None if shutil.which("openssl") else "openssl not found")
    if reason is not None:
        pytest.skip(reason)
    settings = {"max_connections": str(MAX_CONNECTIONS), "log_connections": "on"}
    with running_cluster(settings, tls=True) as cluster:
        yield cluster


def name_of(url: str) -> str:
    return database_name(url.split("?", 1)[0])


def connections(cluster: PostgresCluster, url: str) -> list[tuple[str, bool]]:
    """(application_name, ssl) of every connection to the database but ours."""
    return [
        (str(name), bool(ssl))
        for name, ssl in cluster.fetch(
            "SELECT a.application_name, s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a"
            " USING (pid) WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
            name_of(url),
        )
    ]


def authorized(cluster: PostgresCluster, url: str) -> list[str]:
    """The server's log line for every connection ever made to the database."""
    wanted = re.compile(f"connection authorized: user=postgres database={name_of(url)}( |$)")
    return [line for line in cluster.log.read_text().splitlines() if wanted.search(line)]


@pytest.mark.parametrize(("sslmode", "encrypted"), [("require", True), ("disable", False)])
def test_sslmode_from_the_url_holds_for_every_connection(
    tls_cluster: PostgresCluster, make_client: MakeClient, sslmode: str, encrypted: bool
) -> None:
    # disable beside require: the same checks do see an unencrypted connection.
    url = tls_cluster.create_database("tls") + f"?sslmode={sslmode}"
    env = {"DATABASE_URL": url, "WEBHOOK_SECRET": "x" * 32}
    assert run_module(env, "app", "init-db").returncode == 0
    client = make_client(database_url=url)
    assert client.post_signed(message(message_id="over-tls")).status_code == 200
    assert client.get("/messages").json()["total"] == 1
    assert client.get("/health/ready").status_code == 200

    live = connections(tls_cluster, url)
    names = {name for name, _ in live}
    assert {"webhook-receiver", "webhook-receiver-reads", "webhook-receiver-feed"} <= names
    assert all(ssl is encrypted for _, ssl in live), live

    exported = run_module(env, "app", "export")
    assert exported.returncode == 0, exported.stderr
    assert json.loads(exported.stdout)["message_id"] == "over-tls"
    # Every connection ever made, the closed ones too: init-db's, start-up's
    # migration, the pools', the export's.
    lines = authorized(tls_cluster, url)
    assert sum("application_name=webhook-receiver-migrate" in line for line in lines) == 2
    assert len(lines) >= len(live) + 3
    assert all(("SSL enabled" in line) is encrypted for line in lines), lines


def start_refused(tmp_path: Path, env: dict[str, str]) -> tuple[int, list[dict[str, Any]]]:
    """Start `python -m app serve`, which must exit; its exit code and its log lines."""
    with running_server(tmp_path, env=env, command=SERVE, wait=False) as server:
        code = server.process.wait(timeout=60)
        output = server.log_path.read_text()
    assert PASSWORD not in output
    return code, [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def critical(lines: list[dict[str, Any]]) -> str:
    (line,) = [line for line in lines if line["level"] == "CRITICAL"]
    return f"{line['msg']}: {line['reason']}"


@pytest.mark.slow
@pytest.mark.parametrize("ca", [SYSTEM_CAS, "server.crt"])
def test_verify_full_starts_only_with_the_ca_that_signed_the_server(
    tls_cluster: PostgresCluster, tmp_path: Path, ca: str
) -> None:
    root = ca if ca == SYSTEM_CAS else str(tls_cluster.root / ca)
    url = tls_cluster.create_database("verify") + f"?sslmode=verify-full&sslrootcert={root}"
    env = {"DATABASE_URL": url, "DATABASE_STARTUP_TIMEOUT_SECONDS": "30"}
    if ca == SYSTEM_CAS:
        # At once, not after the start-up timeout: a certificate is not transient.
        code, lines = start_refused(tmp_path, env)
        assert code != 0
        assert critical(lines) == (
            "cannot start: cannot connect to the database:"
            " SSLCertVerificationError: the server's certificate was refused"
            " (self-signed certificate)"
        )
        return
    with running_server(tmp_path, env=env, command=SERVE) as server:
        assert server.process.poll() is None


@pytest.mark.parametrize(
    ("option", "said"),
    [
        ("&sslrootcert=/nowhere/root.crt", "sslrootcert=/nowhere/root.crt in the URL is not a"),
        ("", "ClientConfigurationError: root certificate file"),
    ],
)
def test_verify_full_without_a_root_certificate_names_what_is_missing(
    tls_cluster: PostgresCluster, tmp_path: Path, option: str, said: str
) -> None:
    # At once: DATABASE_STARTUP_TIMEOUT_SECONDS (30 s) is not waited out.
    url = tls_cluster.url() + "?sslmode=verify-full" + option
    result = run_module({"DATABASE_URL": url, "HOME": str(tmp_path)}, "app", "init-db")
    assert result.returncode != 0
    assert said in result.stderr
    assert PASSWORD not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("pool_size", "starts"), [(ALLOWED - 1, True), (ALLOWED, False)])
def test_a_pool_the_server_cannot_hold_is_refused_at_start_up(
    tls_cluster: PostgresCluster, tmp_path: Path, pool_size: int, starts: bool
) -> None:
    # The pool and the feed's LISTEN: ALLOWED - 1 fits exactly, ALLOWED is one too many.
    env = {
        "DATABASE_URL": tls_cluster.create_database("budget"),
        "DATABASE_POOL_SIZE": str(pool_size),
    }
    if starts:
        with running_server(tmp_path, env=env, command=SERVE) as server:
            assert server.process.poll() is None
        return
    code, lines = start_refused(tmp_path, env)
    assert code != 0
    assert critical(lines) == (
        f"cannot start: this process needs {ALLOWED + 1} connections to"
        f" PostgreSQL (a pool of {ALLOWED} and the feed's LISTEN), more than the server allows"
        f" (max_connections {MAX_CONNECTIONS} - superuser_reserved_connections 3 = {ALLOWED});"
        " lower DATABASE_POOL_SIZE or raise the limit (docs/postgres.md, Connection budget)"
    )


def test_a_role_connection_limit_below_the_pool_is_refused(
    tls_cluster: PostgresCluster, make_client: MakeClient
) -> None:
    url = tls_cluster.create_database("limited")
    tls_cluster.execute(f"CREATE ROLE limited LOGIN PASSWORD '{PASSWORD}' CONNECTION LIMIT 5")
    tls_cluster.execute(f'ALTER DATABASE "{database_name(url)}" OWNER TO limited')
    limited = url.replace("postgres:", "limited:", 1)
    with pytest.raises(StorageUnavailable, match="more than the role's CONNECTION LIMIT of 5"):
        make_client(database_url=limited, database_pool_size=5)
    client = make_client(database_url=limited, database_pool_size=4)
    assert client.post_signed(message()).status_code == 200


@contextlib.contextmanager
def held_connections(url: str, count: int) -> Iterator[None]:
    """`count` connections to `url`, open until the block ends (on a loop of their own)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=30)

    try:
        held = [run(asyncpg.connect(url)) for _ in range(count)]
        yield
        for conn in held:
            run(conn.close())
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.mark.parametrize(("others", "warned"), [(0, False), (8, True)])
def test_a_pool_that_fits_only_once_others_close_starts_with_a_warning(
    tls_cluster: PostgresCluster,
    make_client: MakeClient,
    caplog: pytest.LogCaptureFixture,
    others: int,
    warned: bool,
) -> None:
    # 17 allowed, 8 taken: 9 free for the 10 + 1 this process needs.
    url = tls_cluster.create_database("crowded")
    with caplog.at_level(logging.WARNING, logger="app.storage"), held_connections(url, others):
        client = make_client(database_url=url, database_pool_size=10)
        assert client.post_signed(message()).status_code == 200
    warnings = [
        (record.needed, record.free)  # type: ignore[attr-defined]
        for record in caplog.records
        if record.getMessage() == "the database has fewer free connections than this process needs"
    ]
    assert warnings == ([(11, ALLOWED - others)] if warned else [])


def limits(**overrides: Any) -> ServerLimits:
    values: dict[str, Any] = {
        "max_connections": 100,
        "superuser_reserved": 3,
        "reserved": 0,
        "superuser": False,
        "role_limit": -1,
        "database_limit": -1,
        "in_use": 1,
    }
    return ServerLimits(**{**values, **overrides})


@pytest.mark.parametrize(
    ("server", "needed", "refused"),
    [
        (limits(), 97, None),
        (limits(), 98, "the server allows (max_connections 100 - superuser_reserved"),
        # PostgreSQL 16's reserved_connections comes off as well.
        (limits(reserved=5), 93, "- reserved_connections 5 = 92)"),
        (limits(database_limit=10), 11, "the database's CONNECTION LIMIT of 10"),
        (limits(role_limit=0), 1, "the role's CONNECTION LIMIT of 0"),
        # Superusers are exempt from both CONNECTION LIMITs, never from the reserved slots.
        (limits(role_limit=2, database_limit=2, superuser=True), 11, None),
        (limits(superuser=True), 98, "the server allows"),
    ],
)
def test_the_budget_counts_every_limit_the_server_applies(
    server: ServerLimits, needed: int, refused: str | None
) -> None:
    refusal = budget_refusal(server, needed, "a pool")
    assert refusal is None if refused is None else refused in (refusal or "")


@contextlib.contextmanager
def frozen(cluster: PostgresCluster) -> Iterator[None]:
    """The postmaster and every backend stopped (SIGSTOP), as in the failure drill."""
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(
        ["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False
    ).stdout.split()
    pids = [postmaster, *map(int, children)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.slow
def test_readiness_answers_at_its_own_deadline_while_the_server_is_frozen(
    tls_cluster: PostgresCluster, make_client: MakeClient
) -> None:
    # A write deadline far beyond the readiness one: a probe that waited for its
    # cancelled statement to unwind would take that long (the drill saw 4 s of 5).
    write_timeout = 30.0
    client = make_client(
        database_url=tls_cluster.create_database("frozen"), write_timeout_seconds=write_timeout
    )
    assert client.get("/health/ready").status_code == 200
    with frozen(tls_cluster):
        started = time.monotonic()
        statuses = [client.get("/health/ready").status_code for _ in range(3)]
        waited = time.monotonic() - started
    assert statuses == [503, 503, 503]
    # A hang guard, far from both: three probes at 1 s each, or 30 s for the first.
    assert waited < 3 * READY_TIMEOUT_SECONDS + write_timeout / 3
    deadline = time.monotonic() + 30
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "not ready again after the server was thawed"
        time.sleep(0.1)
