"""Reader threads for the SQLite store, and how a read is stopped at its deadline.

Every read carries a ticket. While the read runs, its thread registers its connection on
the ticket; the event loop stops the ticket when the read's deadline passes or when its
caller is cancelled (the client went away), and stopping calls sqlite3_interrupt() on
that connection: the statement fails within a few VM steps and the thread is free for the
next read. A read still queued when it is stopped never starts.

interrupt() rather than a progress handler: a handler is Python code, so every call of it
takes the GIL back from a busy event loop (up to a 5 ms switch interval each time); an
interrupt costs the reader nothing until it is needed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from app.storage.base import QueryTooExpensive, StorageUnavailable
from app.storage.sqlite.connection import connect_sqlite, describe_sqlite_error, rollback

logger = logging.getLogger("app.storage")

T = TypeVar("T")


class ReadStopped(Exception):
    """The read was stopped before its thread reached it; it never ran."""


class ReadTicket:
    """One read's claim on a connection; `stop()` interrupts the read wherever it is."""

    __slots__ = ("_conn", "_lock", "stopped")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self.stopped = False

    def start(self, conn: sqlite3.Connection) -> bool:
        """Called by the reading thread; False if the read was stopped before it began."""
        with self._lock:
            if self.stopped:
                return False
            self._conn = conn
            return True

    def finish(self) -> None:
        # Under the lock: once this returns, no interrupt can reach the next read on
        # the same connection.
        with self._lock:
            self._conn = None

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            if self._conn is not None:
                self._conn.interrupt()


def run_ticket(
    ticket: ReadTicket, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]
) -> T:
    """Run `fn` on `conn` (in the thread that owns it) unless the ticket was stopped."""
    if not ticket.start(conn):
        raise ReadStopped
    try:
        result = fn(conn)
    except BaseException:
        ticket.finish()
        # An interrupted statement leaves its transaction open; the next read starts clean.
        rollback(conn)
        raise
    ticket.finish()
    return result


async def await_read(
    ticket: ReadTicket, future: asyncio.Future[T], timeout: float, tickets: set[ReadTicket]
) -> T:
    """The read's result, or QueryTooExpensive once `timeout` passes (the read is stopped).

    Cancelling the caller stops the read as well. `tickets` holds the reads in flight,
    so that closing the store can stop them all.
    """
    tickets.add(ticket)
    try:
        async with asyncio.timeout(timeout):
            return await future
    except TimeoutError:
        ticket.stop()
        raise QueryTooExpensive(f"read stopped at its {timeout:g} s deadline") from None
    except asyncio.CancelledError:
        ticket.stop()
        raise
    except sqlite3.Error as exc:
        raise StorageUnavailable(describe_sqlite_error(exc)) from None
    except ReadStopped:
        raise QueryTooExpensive("read stopped before it started") from None
    finally:
        tickets.discard(ticket)


class ReaderPool:
    """Threads with a read-only connection each (opened on first use), and their reads.

    `nice` lowers the threads' scheduling priority (Linux: per thread, SCHED_IDLE, or
    that nice value where the policy cannot be set), for reads that may scan: when the
    CPU is short, they yield it to the event loop and the writer.
    """

    def __init__(
        self, path: str, *, threads: int, busy_timeout_ms: int, name: str, nice: int = 0
    ) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._nice = nice
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._tickets: set[ReadTicket] = set()
        self._executor = ThreadPoolExecutor(
            threads, thread_name_prefix=name, initializer=self._lower_priority
        )

    def busy(self) -> bool:
        """Whether a read is running or waiting (callable from any thread)."""
        return bool(self._tickets)

    async def run(self, fn: Callable[[sqlite3.Connection], T], timeout: float) -> T:
        ticket = ReadTicket()
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self._in_thread, ticket, fn
        )
        return await await_read(ticket, future, timeout, self._tickets)

    def _in_thread(self, ticket: ReadTicket, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if ticket.stopped:
                raise ReadStopped
            conn = connect_sqlite(self.path, busy_timeout_ms=self._busy_timeout_ms, readonly=True)
            conn.execute("PRAGMA cache_size = -8000")
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return run_ticket(ticket, conn, fn)

    def _lower_priority(self) -> None:
        if not self._nice or sys.platform != "linux":
            # Elsewhere these calls would apply to the whole process.
            return
        tid = threading.get_native_id()
        try:
            # SCHED_IDLE: the thread runs only on a core nothing else wants, and any
            # thread that wakes up takes the core from it at once. The nice value stays
            # as the fallback where the policy cannot be set.
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except (OSError, AttributeError):
            pass
        else:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, tid, self._nice)
        except OSError as exc:
            logger.warning("cannot lower a reader thread's priority", extra={"error": str(exc)})

    async def close(self) -> None:
        """Stop every read in flight, wait for the threads, close the connections."""
        for ticket in list(self._tickets):
            ticket.stop()
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
