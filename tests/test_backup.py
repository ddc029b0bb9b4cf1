"""`python -m app backup` and `restore` on SQLite: a consistent copy of a live database,
and a restore that refuses what it should."""

from __future__ import annotations

import contextlib
import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from app.main import create_app
from app.storage.migrations import SCHEMA_VERSION
from app.storage.sqlite.backup import BackupError, backup, restore
from app.storage.sqlite.connection import init_sqlite
from tests.support.battery import Connection, Ledger, signed
from tests.support.clients import AppClient
from tests.support.lifecycle import corpus, lifecycle_settings, post_all
from tests.support.servers import run_module, running_server

LOAD_CONNECTIONS = 64


class Load:
    """LOAD_CONNECTIONS threads, each on its own connection, posting fresh messages."""

    def __init__(self, base_url: str, ledger: Ledger) -> None:
        self.base_url = base_url
        self.ledger = ledger
        self.ids = (f"load-{n}" for n in itertools.count())
        self.ids_lock = threading.Lock()
        self.done = threading.Event()
        self.threads = [
            threading.Thread(target=self.run, daemon=True) for _ in range(LOAD_CONNECTIONS)
        ]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(timeout=30)

    def run(self) -> None:
        with Connection(self.base_url, timeout=10) as client:
            while not self.done.is_set():
                with self.ids_lock:
                    message_id = next(self.ids)
                body, signature = signed(message_id, text=f"load {message_id}")
                try:
                    status: int | None = client.post_webhook(body, signature).status
                except OSError:
                    status = None
                self.ledger.note(message_id, status)


def acked(ledger: Ledger) -> set[str]:
    with ledger.lock:
        return set(ledger.acked)


def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition(), "timed out"


def ids_in(path: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return {row[0] for row in conn.execute("SELECT message_id FROM messages")}
    finally:
        conn.close()


@pytest.mark.slow
def test_a_backup_under_load_holds_everything_acknowledged_before_it_began(
    tmp_path: Path,
) -> None:
    ledger = Ledger()
    copy = tmp_path / "backups" / "copy.db"
    with running_server(tmp_path) as server, Load(server.base_url, ledger):
        wait_for(lambda: len(acked(ledger)) >= 1500, 60)
        before = acked(ledger)
        result = run_module(server.env, "app", "backup", str(copy))
        assert result.returncode == 0, result.stderr
        assert "integrity ok" in result.stdout
        during = acked(ledger)
        wait_for(lambda: len(acked(ledger)) >= len(during) + 500, 60)
    assert len(during) > len(before)  # ingest went on while the copy was taken
    assert not list(copy.parent.glob("*.partial-*"))
    stored = ids_in(copy)
    assert before <= stored
    assert stored <= ledger.acked | ledger.unknown  # nothing that was never sent

    # The copy restores to a database a service opens and counts exactly.
    restored = tmp_path / "restored" / "app.db"
    result = run_module({"DATABASE_URL": f"sqlite:///{restored}"}, "app", "restore", str(copy))
    assert result.returncode == 0, result.stderr
    assert ids_in(restored) == stored
    with running_server(tmp_path / "restored", db_path=restored) as server:
        with Connection(server.base_url) as client:
            stats = json.loads(client.request("GET", "/stats").body)
        assert stats["total_messages"] == len(stored)


@pytest.fixture
def database(tmp_path: Path) -> Path:
    """A database with 30 messages, that no process has open any more."""
    path = tmp_path / "app.db"
    with AppClient(create_app(lifecycle_settings(f"sqlite:///{path}"))) as client:
        post_all(client, corpus(30))
    return path


def test_backup_never_overwrites_and_needs_a_database(database: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.db"
    made = backup(str(database), str(copy))
    assert (made.messages, made.schema_version) == (30, SCHEMA_VERSION)
    with pytest.raises(BackupError, match="exists"):
        backup(str(database), str(copy))
    with pytest.raises(BackupError, match="no database"):
        backup(str(tmp_path / "absent.db"), str(tmp_path / "other.db"))
    # A self-contained file: no WAL beside it, readable read-only.
    assert not Path(f"{copy}-wal").exists()
    assert len(ids_in(copy)) == 30


def test_restore_refuses_a_database_in_use(database: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.db"
    backup(str(database), str(copy))
    holder = sqlite3.connect(database, isolation_level=None)
    try:
        holder.execute("PRAGMA journal_mode = WAL")
        holder.execute("SELECT count(*) FROM messages").fetchall()
        with pytest.raises(BackupError, match="in use"):
            restore(str(copy), str(database))
    finally:
        holder.close()
    assert len(ids_in(database)) == 30


def test_restore_keeps_the_database_it_replaces(database: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.db"
    backup(str(database), str(copy))
    with contextlib.closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("DELETE FROM messages WHERE message_id < 'm00010'")
    restored, aside = restore(str(copy), str(database))
    assert restored.messages == 30
    assert aside is not None
    assert len(ids_in(database)) == 30
    assert len(ids_in(Path(aside))) == 20


def test_restore_refuses_a_damaged_file(database: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.db"
    backup(str(database), str(copy))
    data = bytearray(copy.read_bytes())
    # Scribble over the middle of the file: pages of the table and its indexes.
    middle = len(data) // 2
    data[middle : middle + 4096] = b"\xa5" * 4096
    copy.write_bytes(bytes(data))
    with pytest.raises(BackupError, match=r"integrity check failed|not a readable"):
        restore(str(copy), str(database))
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(BackupError, match="not a readable SQLite database"):
        restore(str(garbage), str(database))
    assert len(ids_in(database)) == 30


def test_restore_refuses_another_schema_version(database: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    init_sqlite(str(other))
    with contextlib.closing(sqlite3.connect(other)) as conn, conn:
        conn.execute(
            "UPDATE schema_version SET version = version - 1 WHERE version = ?", (SCHEMA_VERSION,)
        )
    with pytest.raises(BackupError, match=f"schema version {SCHEMA_VERSION - 1};"):
        restore(str(other), str(database))
    foreign = tmp_path / "foreign.db"
    with contextlib.closing(sqlite3.connect(foreign)) as conn:
        conn.execute("CREATE TABLE t (a)")
    with pytest.raises(BackupError, match="not a database of this service"):
        restore(str(foreign), str(database))


def test_restore_refuses_a_live_database_with_its_log(database: Path, tmp_path: Path) -> None:
    live = sqlite3.connect(database, isolation_level=None)
    try:
        live.execute("PRAGMA journal_mode = WAL")
        live.execute("DELETE FROM messages WHERE message_id = 'm00001'")
        with pytest.raises(BackupError, match="write-ahead log beside it"):
            restore(str(database), str(tmp_path / "elsewhere.db"))
    finally:
        live.close()


def test_restore_into_a_new_place(database: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.db"
    backup(str(database), str(copy))
    target = tmp_path / "new" / "app.db"
    restored, aside = restore(str(copy), str(target))
    assert (restored.messages, aside) == (30, None)
    assert len(ids_in(target)) == 30
