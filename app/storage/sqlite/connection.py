"""Opening a SQLite connection the way every part of the SQLite store needs it."""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat

from app.storage.migrations import SCHEMA_VERSION, apply_sqlite_schema

logger = logging.getLogger("app.storage")

# Rows per transaction at most; a burst bigger than this is committed in several.
MAX_BATCH = 512
# Page size of a database this service creates (see connect_sqlite).
PAGE_SIZE = 2048


def connect_sqlite(
    path: str, *, busy_timeout_ms: int, readonly: bool = False
) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False only
    # so that close() may run on another thread; each connection is used by one thread.
    conn = sqlite3.connect(
        path,
        isolation_level=None,
        check_same_thread=False,
        timeout=0,
        cached_statements=MAX_BATCH + 100,  # the writer's group inserts, one per size
    )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    # For a new database only (an existing one keeps its size). Inserts land at random
    # places in the indexes and each commit writes every page it touched to the WAL:
    # 2 KB pages write a third less than the default 4 KB, for a tenth less CPU.
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    if path != ":memory:":
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal" and not readonly:
            raise sqlite3.OperationalError(f"could not switch to WAL (journal_mode={mode})")
    # FULL: in WAL mode every commit fsyncs the log. NORMAL would only survive a crash
    # of the process, not a power cut.
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA temp_store = MEMORY")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    return conn


def init_sqlite(path: str) -> int:
    """Create or upgrade the schema of a SQLite database file (the `init-db` command)."""
    prepare_database_file(path)
    conn = connect_sqlite(path, busy_timeout_ms=5000)
    try:
        apply_sqlite_schema(conn)
    finally:
        conn.close()
    return SCHEMA_VERSION


def prepare_database_file(path: str) -> None:
    """The database's folder and file, private to this user, before SQLite opens them.

    A folder we create is 0700 and a new database file 0600; SQLite gives the -wal and
    -shm files it creates the database file's mode. Files of ours that are open to
    others (made by an earlier version, or by hand) are tightened to 0600, with a
    warning; a folder that already exists is left as it is (it may be a shared one).
    """
    if path == ":memory:":
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for name in (path, path + "-wal", path + "-shm"):
        _make_private(name)


def _make_private(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode) or not mode & 0o077:
        return
    try:
        os.chmod(path, 0o600)
    except OSError as exc:
        logger.warning(
            "database file is readable by others and cannot be made private",
            extra={
                "file": os.path.basename(path),
                "mode": oct(mode & 0o777),
                "error": exc.strerror,
            },
        )
        return
    logger.warning(
        "database file was readable by others; made private (0600)",
        extra={"file": os.path.basename(path), "mode_was": oct(mode & 0o777)},
    )


def describe_sqlite_error(exc: sqlite3.Error) -> str:
    code = getattr(exc, "sqlite_errorname", None)
    return f"{code}: {exc}" if code else str(exc)


def rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass
