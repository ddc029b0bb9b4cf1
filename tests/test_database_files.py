"""The SQLite database, its -wal and -shm files and the folder made for them are private to
the service's user: messages are personal data."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from app.storage.sqlite.connection import init_sqlite
from tests.support.clients import MakeClient, json_lines, message


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_database_and_its_folder_are_private(make_client: MakeClient, tmp_path: Path) -> None:
    db = tmp_path / "made-here" / "app.db"
    client = make_client(database_url=f"sqlite:///{db}")
    assert client.post_signed(message()).status_code == 200
    assert mode(db.parent) == 0o700
    for name in ("app.db", "app.db-wal", "app.db-shm"):
        assert (db.parent / name).exists()
        assert mode(db.parent / name) == 0o600, name


def test_init_db_makes_a_private_database(tmp_path: Path) -> None:
    db = tmp_path / "init" / "app.db"
    init_sqlite(str(db))
    assert (mode(db.parent), mode(db)) == (0o700, 0o600)


def test_files_open_to_others_are_made_private_with_a_warning(
    make_client: MakeClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "app.db"
    init_sqlite(str(db))
    (tmp_path / "app.db-wal").write_bytes(b"")
    for path in (db, tmp_path / "app.db-wal"):
        os.chmod(path, 0o644)
    capsys.readouterr()
    client = make_client(database_url=f"sqlite:///{db}")
    assert client.post_signed(message()).status_code == 200
    assert mode(db) == 0o600
    assert mode(tmp_path / "app.db-wal") == 0o600
    warnings = [
        line
        for line in json_lines(capsys.readouterr().out)
        if line["msg"] == "database file was readable by others; made private (0600)"
    ]
    assert {line["file"] for line in warnings} == {"app.db", "app.db-wal"}
    assert all(line["level"] == "WARNING" for line in warnings)


def test_a_folder_that_already_exists_is_left_as_it_is(
    make_client: MakeClient, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)  # noqa: S103 - a folder shared on purpose
    client = make_client(database_url=f"sqlite:///{shared / 'app.db'}")
    assert client.get("/health/ready").status_code == 200
    assert mode(shared) == 0o755
    assert mode(shared / "app.db") == 0o600
