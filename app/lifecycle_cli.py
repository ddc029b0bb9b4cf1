"""`python -m app export | import | backup | restore` (docs/lifecycle.md).

All four read DATABASE_URL (and nothing else: no WEBHOOK_SECRET needed) and go straight
to the database. Exit codes as app/cli.py's: 0 done; 1 done in part or refused (an
invalid import line, a failed check, the database unreachable); 2 a usage or
configuration error.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from typing import BinaryIO

import asyncpg

from app.config import ConfigError, load_database_settings
from app.database_config import DatabaseSettings
from app.logging_utils import refuse_to_start
from app.models import InvalidMessage, ListQuery, check_msisdn, instant_key
from app.storage import MessageStore, PostgresStore, SQLiteStore, StorageUnavailable
from app.storage.lifecycle import (
    IMPORT_BATCH,
    ImportCounts,
    ImportRow,
    describe_invalid,
    export_line,
    parse_import_line,
)
from app.storage.postgres.connection import (
    CONNECT_TIMEOUT_SECONDS,
    DATABASE_ERRORS,
    SETUP_ERRORS,
    describe,
    describe_connect,
)
from app.storage.postgres.lifecycle import export_page
from app.storage.postgres.sql import CHECK_SCHEMA
from app.storage.sqlite.backup import BackupError, backup, restore
from app.storage.sqlite.connection import connect_sqlite
from app.storage.sqlite.lifecycle import export_all
from app.storage.sqlite.reads import check_schema

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# Rows per write(2) of an export.
EXPORT_CHUNK = 2000
# A valid line is a few KB (text is at most 4096 characters); far longer is not an export.
MAX_LINE_BYTES = 1024 * 1024
# A command run by hand waits longer for the database than a webhook does.
CLI_TIMEOUT_SECONDS = 60.0


class Refused(Exception):
    """The command cannot go on; the message is for the operator."""


def fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"python -m app: {message}", file=sys.stderr)
    return code


def database_settings() -> DatabaseSettings | None:
    try:
        return load_database_settings()
    except ConfigError as exc:
        refuse_to_start(str(exc))
        return None


def export(
    sender: str | None, recipient: str | None, since: str | None, until: str | None, q: str | None
) -> int:
    """Write every matching message to stdout as NDJSON, from one snapshot."""
    try:
        query = ListQuery(
            sender=None if sender is None else check_msisdn(sender),
            recipient=None if recipient is None else check_msisdn(recipient),
            since_key=None if since is None else instant_key(since),
            until_key=None if until is None else instant_key(until),
            q=q or None,
        )
    except ValueError as exc:
        return fail(f"--from, --to, --since or --until {exc}", EXIT_USAGE)
    settings = database_settings()
    if settings is None:
        return EXIT_USAGE
    out = sys.stdout.buffer
    try:
        if settings.database.scheme == "sqlite":
            count = _export_sqlite(settings.database.target, query, out)
        else:
            # Directly, not through a pooler: one long snapshot, read through a cursor.
            count = asyncio.run(_export_postgres(settings.direct_database_url, query, out))
        out.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and let nothing flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except (Refused, StorageUnavailable) as exc:
        return fail(f"export: {exc}")
    print(f"exported {count} messages", file=sys.stderr)
    return EXIT_OK


def _export_sqlite(path: str, query: ListQuery, out: BinaryIO) -> int:
    if path == ":memory:" or not os.path.isfile(path):
        raise Refused(f"no database at {path}")
    conn = connect_sqlite(path, busy_timeout_ms=5000, readonly=True)
    count = 0
    try:
        check_schema(conn)
        for rows in export_all(conn, query, EXPORT_CHUNK):
            out.write(b"".join(map(export_line, rows)))
            count += len(rows)
    finally:
        conn.close()
    return count


async def _export_postgres(url: str, query: ListQuery, out: BinaryIO) -> int:
    try:
        conn = await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_SECONDS)
    except (*DATABASE_ERRORS, *SETUP_ERRORS) as exc:
        raise Refused(f"cannot connect to the database: {describe_connect(exc, url)}") from None
    count = 0
    try:
        version, _ = await conn.fetchrow(CHECK_SCHEMA) or (None, None)
        if version is None:
            raise Refused("the database has no schema: nothing to export")
        # One snapshot for the whole export, read through a cursor: constant memory.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            sql, args = export_page(query)
            cursor = await conn.cursor(sql, *args)
            while records := await cursor.fetch(EXPORT_CHUNK):
                out.write(b"".join(export_line(tuple(record)) for record in records))
                count += len(records)
    except DATABASE_ERRORS as exc:
        raise Refused(f"the database failed: {describe(exc)}") from None
    finally:
        await conn.close()
    return count


def import_(path: str, skip_invalid: bool) -> int:
    """Store every line of an export that is not stored yet; a summary at the end."""
    settings = database_settings()
    if settings is None:
        return EXIT_USAGE
    if settings.database.is_memory:
        return fail("import needs a database file or PostgreSQL, not :memory:", EXIT_USAGE)
    try:
        source = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        return fail(f"cannot read {path}: {exc.strerror or type(exc).__name__}", EXIT_USAGE)
    try:
        return asyncio.run(_import(settings, source, skip_invalid))
    finally:
        source.close()


async def open_for_cli(settings: DatabaseSettings) -> MessageStore:
    database = settings.database
    if database.scheme == "sqlite":
        return await SQLiteStore.open(
            database.target,
            busy_timeout_ms=5000,
            write_timeout=CLI_TIMEOUT_SECONDS,
            read_timeout=CLI_TIMEOUT_SECONDS,
        )
    # The smallest pools: one connection each for writes, reads and the probe.
    return await PostgresStore.open(
        database.target,
        pool_size=3,
        read_pool_size=1,
        write_timeout=CLI_TIMEOUT_SECONDS,
        read_timeout=CLI_TIMEOUT_SECONDS,
        startup_timeout=settings.database_startup_timeout_seconds,
        direct_url=settings.direct_database_url,
        pooled=settings.database_pooler != "none",
    )


async def _import(settings: DatabaseSettings, source: BinaryIO, skip_invalid: bool) -> int:
    try:
        store = await open_for_cli(settings)
    except StorageUnavailable as exc:
        return fail(f"import: {exc}")
    counts = ImportCounts()
    read = invalid = 0
    stopped_at: int | None = None
    batch: list[ImportRow] = []
    # One batch in the database while the next is read and checked: the two overlap.
    # Batches commit without waiting for the disk, except the last, whose commit makes
    # every one before it durable too: so one full batch is held back until the next
    # line shows whether it is the last.
    pending: asyncio.Future[ImportCounts] | None = None
    held: list[ImportRow] = []

    async def hand_over(rows: list[ImportRow], durable: bool) -> None:
        nonlocal pending
        if pending is not None:
            counts.add(await pending)
        pending = asyncio.ensure_future(store.lifecycle.import_rows(rows, durable=durable))
        await asyncio.sleep(0)  # let it start (PostgreSQL: send it) before parsing on

    try:
        for number, raw in _numbered_lines(source):
            if not raw.strip():
                continue
            read += 1
            try:
                if len(raw) > MAX_LINE_BYTES:
                    raise Refused(f"longer than {MAX_LINE_BYTES} bytes")
                batch.append(parse_import_line(raw))
            except (InvalidMessage, Refused) as exc:
                invalid += 1
                why = describe_invalid(exc) if isinstance(exc, InvalidMessage) else str(exc)
                print(f"line {number}: {why}", file=sys.stderr)
                if not skip_invalid:
                    # Every line before this one is imported; none from it on.
                    stopped_at = number
                    break
                continue
            if len(batch) == IMPORT_BATCH:
                if held:
                    await hand_over(held, durable=False)
                held, batch = batch, []
        if held and batch:
            await hand_over(held, durable=False)
        if batch or held:
            await hand_over(batch or held, durable=True)
        if pending is not None:
            counts.add(await pending)
    except StorageUnavailable as exc:
        _summary(read, counts, invalid)
        return fail(f"import stopped, the database failed: {exc} (run it again: it is idempotent)")
    finally:
        await store.close()
    _summary(read, counts, invalid)
    if stopped_at is not None:
        return fail(
            f"import stopped at line {stopped_at}: the lines before it are imported;"
            " fix it and run the import again (or pass --skip-invalid)"
        )
    return EXIT_FAILED if invalid else EXIT_OK


def _numbered_lines(source: BinaryIO) -> Iterator[tuple[int, bytes]]:
    number = 0
    while raw := source.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            # Too long: skip the rest of it, and hand over what came (it will be refused).
            while (rest := source.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass
        yield number, raw


def _summary(read: int, counts: ImportCounts, invalid: int) -> None:
    print(
        f"read {read} lines: {counts.created} created, {counts.duplicate} already stored,"
        f" {counts.tombstoned} refused (erased or purged), {invalid} invalid"
    )


def backup_(path: str) -> int:
    settings = database_settings()
    if settings is None:
        return EXIT_USAGE
    database = settings.database
    if database.scheme != "sqlite" or database.is_memory:
        return fail(
            "backup copies a SQLite database file; for PostgreSQL use pg_dump (docs/lifecycle.md)",
            EXIT_USAGE,
        )
    try:
        copy = backup(database.target, path)
    except BackupError as exc:
        return fail(f"backup: {exc}")
    print(
        f"backup of {copy.messages} messages (schema version {copy.schema_version}) written"
        f" to {copy.path}: {copy.bytes / 1e6:.1f} MB in {copy.seconds:.1f} s, integrity ok"
    )
    return EXIT_OK


def restore_(path: str) -> int:
    settings = database_settings()
    if settings is None:
        return EXIT_USAGE
    database = settings.database
    if database.scheme != "sqlite" or database.is_memory:
        return fail(
            "restore replaces a SQLite database file; for PostgreSQL use pg_restore"
            " (docs/lifecycle.md)",
            EXIT_USAGE,
        )
    try:
        copy, aside = restore(path, database.target)
    except BackupError as exc:
        return fail(f"restore: {exc}")
    print(
        f"restored {copy.messages} messages (schema version {copy.schema_version})"
        f" to {copy.path}" + (f"; the database it replaced is now {aside}" if aside else "")
    )
    return EXIT_OK
