"""A throwaway PostgreSQL cluster on a loopback port, from the locally installed binaries.

PostgreSQL refuses to run as root, and CI runs as root: there the server runs as the
`postgres` user (runuser), in a temporary folder that user owns. The cluster lives only
as long as the test session, on a free port, so parallel sessions never meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from app.storage.migrations import apply_postgres_schema

USER = "postgres"
PASSWORD = secrets.token_hex(8)
# What the tests need from the server beyond the defaults. fsync stays on: the kill
# tests must see what a real crash leaves behind.
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
    "logging_collector": "off",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_binaries() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None."""
    configured = os.environ.get("PG_BIN")
    if configured:
        # Only there: PG_BIN=/nowhere runs the suite as if none were installed.
        candidates = [Path(configured)]
    else:
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
        on_path = shutil.which("initdb")
        if on_path:
            # /usr/local/bin/initdb links into /usr/lib/postgresql/15/bin, and pg_ctl
            # looks for `postgres` beside the real file.
            candidates.insert(0, Path(on_path).resolve().parent)
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def why_unavailable() -> str | None:
    """None if a cluster can be started here, else why not (the tests skip with it)."""
    if find_binaries() is None:
        return (
            "PostgreSQL binaries (initdb, pg_ctl, postgres) not found on PATH, in PG_BIN or "
            "under /usr/lib/postgresql: the PostgreSQL variants of the tests are skipped"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(USER)
        except KeyError:
            return "running as root without a 'postgres' user to run PostgreSQL as: skipped"
        if shutil.which("runuser") is None:
            return "running as root without runuser to start PostgreSQL as 'postgres': skipped"
    return None


class PostgresCluster:
    """One initdb'd cluster: start, stop, restart, make databases, run admin SQL."""

    def __init__(
        self, binaries: Path | None = None, settings: dict[str, str] | None = None
    ) -> None:
        found = binaries or find_binaries()
        if found is None:
            raise RuntimeError("no PostgreSQL binaries")
        self.binaries = found
        self.as_postgres = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="pgtest-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self._databases = 0
        self._shared = ""
        self.settings = {**SETTINGS, **(settings or {})}
        if self.as_postgres:
            shutil.chown(self.root, user=USER, group=USER)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def _run(self, argv: Sequence[str]) -> None:
        command = [str(self.binaries / argv[0]), *argv[1:]]
        if self.as_postgres:
            command = ["runuser", "-u", USER, "--", *command]
        subprocess.run(command, check=True, capture_output=True, cwd=self.root)

    def init(self) -> None:
        password_file = self.root / "password"
        password_file.write_text(PASSWORD)
        if self.as_postgres:
            shutil.chown(password_file, user=USER, group=USER)
        self._run(
            [
                "initdb",
                "-D",
                str(self.data),
                "-U",
                USER,
                f"--pwfile={password_file}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        password_file.unlink()
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(f"port = {self.port}\n")
            conf.write(f"unix_socket_directories = '{self.root}'\n")
            for name, value in self.settings.items():
                conf.write(f"{name} = {value}\n")

    def own(self, path: Path) -> None:
        """Give `path` to the user the server runs as (a key file must be its own)."""
        if self.as_postgres:
            shutil.chown(path, user=USER, group=USER)

    def start(self) -> None:
        self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start"])

    def stop(self, mode: str = "fast") -> None:
        self._run(["pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"])

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; returns its URL."""
        self._databases += 1
        name = f"{prefix}_{self._databases}"
        self.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def clean_database(self) -> str:
        """The shared test database, migrated and emptied; returns its URL.

        Emptying is far cheaper than a new database per test (each copies a template of
        several MB); tests that change the schema itself use create_database().
        """
        if not self._shared:
            self._shared = self.create_database("shared")
            run_sync(_migrate(self._shared))
        self.execute(
            "TRUNCATE messages, message_count_deltas, sender_counts, write_probe,"
            " message_hours, message_hour_deltas, rejections, tombstones;"
            " UPDATE message_totals SET total = 0, senders = 0",
            database=database_name(self._shared),
        )
        return self._shared

    def execute(self, sql: str, *args: Any, database: str = "postgres") -> None:
        run_sync(_execute(self.url(database), sql, args))

    def fetch(self, sql: str, *args: Any, database: str = "postgres") -> list[tuple[Any, ...]]:
        return run_sync(_fetch(self.url(database), sql, args))


@contextlib.contextmanager
def running_cluster(
    settings: dict[str, str] | None = None, *, tls: bool = False
) -> Iterator[PostgresCluster]:
    """A started cluster of our own, removed afterwards (check why_unavailable() first).

    `settings` go to postgresql.conf beside SETTINGS; `tls`: ssl = on, with a
    self-signed certificate for 127.0.0.1 (`cluster.root / "server.crt"`).
    """
    cluster = PostgresCluster(settings=settings)
    try:
        cluster.init()
        if tls:
            enable_tls(cluster)
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


def enable_tls(cluster: PostgresCluster) -> None:
    """ssl = on with a fresh self-signed certificate for 127.0.0.1 (and no CA behind it)."""
    crt, key = cluster.root / "server.crt", cluster.root / "server.key"
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(key), "-out", str(crt)]
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            *subject,
            *files,
        ],
        check=True,
        capture_output=True,
    )
    key.chmod(0o600)
    for path in (crt, key):
        cluster.own(path)
    with open(cluster.data / "postgresql.conf", "a", encoding="utf-8") as conf:
        conf.write(f"ssl = on\nssl_cert_file = '{crt}'\nssl_key_file = '{key}'\n")


async def _migrate(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await apply_postgres_schema(conn)
    finally:
        await conn.close()


async def _execute(url: str, sql: str, args: Sequence[Any]) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


async def _fetch(url: str, sql: str, args: Sequence[Any]) -> list[tuple[Any, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


T = TypeVar("T")


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    # In a thread with its own loop: callable from plain tests and from async ones alike.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def database_name(url: str) -> str:
    return url.rsplit("/", 1)[1]
