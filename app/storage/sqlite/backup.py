"""Backup and restore of a SQLite database file.

A backup runs beside the service: SQLite's online backup API copies every page in one
step, inside one read transaction, so the copy is the database as of one instant (WAL lets
the writer go on meanwhile) and holds every message committed, so acknowledged, before
the copy began. It is written under a temporary name, checked with `PRAGMA
integrity_check`, switched to a rollback journal (one self-contained file), fsync'd and
only then renamed into place: a file with the backup's name is always a whole one.

A restore refuses a file that fails the integrity check or holds another schema version,
and a database that some process still has open; the database it replaces is kept beside
it, renamed, never deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from app.storage.migrations import SCHEMA_VERSION
from app.storage.sqlite.connection import connect_sqlite, describe_sqlite_error

BUSY_TIMEOUT_MS = 5000


class BackupError(Exception):
    """The backup or restore cannot be done; the message says why, for the operator."""


@dataclass(frozen=True, slots=True)
class Copy:
    path: str
    messages: int
    schema_version: int
    bytes: int
    seconds: float


def backup(source: str, destination: str) -> Copy:
    """Copy the live database at `source` to the new file `destination`."""
    started = time.monotonic()
    if not os.path.isfile(source):
        raise BackupError(f"no database at {source}")
    if os.path.exists(destination):
        raise BackupError(f"{destination} exists; a backup never overwrites a file")
    parent = os.path.dirname(os.path.abspath(destination))
    os.makedirs(parent, exist_ok=True)
    partial = f"{destination}.partial-{os.getpid()}"
    try:
        src = connect_sqlite(source, busy_timeout_ms=BUSY_TIMEOUT_MS, readonly=True)
        try:
            dst = sqlite3.connect(partial, isolation_level=None)
            try:
                # pages=-1: every page in one step, so one read transaction, one instant.
                src.backup(dst, pages=-1)
                version, messages = check_copy(dst)
                dst.execute("PRAGMA journal_mode = DELETE")
            finally:
                dst.close()
        finally:
            src.close()
        _fsync(partial)
        os.replace(partial, destination)
        _fsync(parent)
    except sqlite3.Error as exc:
        raise BackupError(f"backup failed: {describe_sqlite_error(exc)}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)
    size = os.path.getsize(destination)
    return Copy(destination, messages, version, size, time.monotonic() - started)


def check_copy(conn: sqlite3.Connection) -> tuple[int, int]:
    """(schema version, messages) of a database that passes `PRAGMA integrity_check`."""
    problems = [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall()]
    if problems != ["ok"]:
        shown = "; ".join(str(problem) for problem in problems[:3])
        raise BackupError(f"the integrity check failed: {shown}")
    try:
        version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        messages = conn.execute("SELECT total FROM message_totals WHERE id = 1").fetchone()[0]
    except sqlite3.DatabaseError:
        raise BackupError("this is not a database of this service (no schema_version)") from None
    return int(version or 0), int(messages)


def restore(source: str, target: str) -> tuple[Copy, str | None]:
    """Put the backup `source` in place of the database `target` (the service stopped).

    The backup is copied beside the target first, and the copy checked: what is checked is
    exactly what is put in place, and the backup itself is never opened for writing.
    Returns the copy, and where the database it replaced now is (None if there was none).
    """
    started = time.monotonic()
    if not os.path.isfile(source):
        raise BackupError(f"no backup at {source}")
    if os.path.exists(source + "-wal"):
        raise BackupError(
            f"{source} has a write-ahead log beside it ({source}-wal): it is a live database"
            " or a raw copy of one; make a backup of it with `python -m app backup` first"
        )
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    partial = f"{target}.partial-{os.getpid()}"
    aside = None
    try:
        shutil.copyfile(source, partial)
        try:
            check = sqlite3.connect(partial, isolation_level=None)
            try:
                version, messages = check_copy(check)
            finally:
                check.close()
        except sqlite3.DatabaseError as exc:
            raise BackupError(f"{source} is not a readable SQLite database: {exc}") from None
        if version != SCHEMA_VERSION:
            raise BackupError(
                f"{source} has schema version {version}; this build restores version"
                f" {SCHEMA_VERSION} only (restore it with the build that made it)"
            )
        _fsync(partial)
        if os.path.exists(target):
            _take_over(target)
            aside = f"{target}.before-restore-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
            # A damaged database may still have a log beside it: it goes aside with it.
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(target + suffix):
                    os.replace(target + suffix, aside + suffix)
        os.replace(partial, target)
        _fsync(parent)
    finally:
        for leftover in (partial, partial + "-wal", partial + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)
    copy = Copy(target, messages, version, os.path.getsize(target), time.monotonic() - started)
    return copy, aside


def _take_over(target: str) -> None:
    """Fold the target's WAL into its file, or refuse if any process has it open.

    Leaving WAL mode needs the database to itself: SQLite answers "locked" while another
    connection (a running service) has it open.
    """
    try:
        conn = sqlite3.connect(target, isolation_level=None, timeout=0)
        try:
            conn.execute("PRAGMA journal_mode = DELETE").fetchone()
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise BackupError(
                f"{target} is in use: stop the service (and anything else that has it"
                " open) before restoring"
            ) from None
        raise BackupError(f"cannot open {target}: {describe_sqlite_error(exc)}") from None
    except sqlite3.DatabaseError:
        # A damaged database is what one restores over: it goes aside as it is.
        pass


def _fsync(path: str) -> None:
    """fsync a file, or a folder (so that a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
