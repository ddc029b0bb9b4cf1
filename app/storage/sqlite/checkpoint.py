"""The SQLite checkpointer: the WAL copied back into the database file, off the request path."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable

from app.storage.sqlite.connection import connect_sqlite, describe_sqlite_error

logger = logging.getLogger("app.storage")

# Past this much log, the checkpointer makes the WAL start over (see Checkpointer).
WAL_RESTART_BYTES = 16 * 1024 * 1024
# Past this much, new scans wait for the log to start over (see Checkpointer): at
# 1,000 inserts/s, after some 2.5 minutes of scans without a pause.
WAL_HOLD_SCANS_BYTES = 1024 * 1024 * 1024
# Before a RESTART, PASSIVE rounds (each then an fsync) until one finds at most this many
# frames appended since the last (see _catch_up), or this many rounds.
CATCH_UP_FRAMES = 256
CATCH_UP_ROUNDS = 4
# How long the checkpointer waits for the writer to run a RESTART before trying later.
RESTART_WAIT_SECONDS = 2.0
# How long the checkpointer lets commits accumulate between two checkpoints.
CHECKPOINT_INTERVAL_SECONDS = 0.25


class Checkpointer(threading.Thread):
    """Copies the WAL back into the database file off the request path.

    The writer runs with wal_autocheckpoint=0, so no webhook ever pays for a checkpoint;
    this thread runs a PASSIVE one (it never blocks the writer) four times a second while
    commits arrive. Often and small, because the copy is not free for the writer either:
    with a checkpoint a second, the commit right after it took 25-45 ms (its fsync waits
    for the disk to take the pages just copied, as ext4 orders them).

    Under a load that never pauses, PASSIVE alone never lets the log start over (the
    writer has always appended more by the time it finishes), and the WAL would grow
    without bound. So once the log holds WAL_RESTART_BYTES, a RESTART follows: it holds
    commits back while it copies the frames appended since and fsyncs the database file,
    and the next commit then writes the log from its start. The database file is fsync'd
    just before, with no lock held, so that the RESTART's own fsync has next to nothing
    left to write: without it, commits stalled for 50-80 ms once a second at 13k rows/s.
    Up to CATCH_UP_ROUNDS more PASSIVEs (each then an fsync) leave it less to copy. The
    RESTART runs on the writer's thread (`restart`, Writer.restart_log), so the commits
    queued behind it start when it ends rather than at the busy handler's next step.

    A RESTART waits (up to its busy timeout) for every reader to leave the log, and holds
    commits back meanwhile; a scan holds its snapshot for seconds, and the frames after
    it cannot be copied back while it runs. So no RESTART is tried while a scan runs
    (`scanning()`): with 64 searches at a time, each try held commits back 200 ms, and
    ingest p99 went from 23 ms to 310 ms. The log grows meanwhile (PASSIVE still copies
    back all but the last few seconds of it). Scans that overlap without end would let
    it grow without end, so past WAL_HOLD_SCANS_BYTES `holding_scans` asks the store to
    start no new scan: the running ones end by their deadline, the log is copied back
    and starts over, scans resume. That catch-up costs commits a stall of a few hundred
    ms (its fsync), hence the high mark: held at 64 MiB, ingest p99 over a 70 s storm
    was 235 ms, against 40 ms not held (the log then reached 590 MB).
    """

    def __init__(
        self,
        path: str,
        committed: threading.Event,
        scanning: Callable[[], bool] = lambda: False,
        restart: Callable[[float], bool | None] | None = None,
    ) -> None:
        super().__init__(name="sqlite-checkpointer", daemon=True)
        self.path = path
        self.committed = committed
        self.scanning = scanning
        # Runs the RESTART where commits queue behind it (Writer.restart_log): whether the
        # log started over, None if not run in time. Unset: on this thread's connection.
        self.restart = restart
        # Set here, read by the store on the event loop: new scans wait while it is True.
        self.holding_scans = False
        self.stopping = threading.Event()

    def run(self) -> None:
        conn = connect_sqlite(self.path, busy_timeout_ms=200)
        database = os.open(self.path, os.O_RDONLY)
        try:
            (page_size,) = conn.execute("PRAGMA page_size").fetchone()
            restart_frames = WAL_RESTART_BYTES // (page_size + 24)  # a frame header is 24
            hold_frames = WAL_HOLD_SCANS_BYTES // (page_size + 24)
            while not self.stopping.is_set():
                # Scans held back wait for a restart even when nothing is committed.
                if not self.committed.wait(timeout=0.5) and not self.holding_scans:
                    continue
                self.committed.clear()
                try:
                    # Asked before the PASSIVE: one that ran beside no scan copied nearly
                    # everything back, and the RESTART after it has little left to do.
                    quiet = not self.scanning()
                    _busy, frames, _copied = conn.execute(
                        "PRAGMA wal_checkpoint(PASSIVE)"
                    ).fetchone()
                    if frames <= restart_frames:
                        self.holding_scans = False
                    elif quiet:
                        self._catch_up(conn, database, frames)
                        restarted = self._restart(conn)
                        # A short read still in the log: tried again after the next commit.
                        self.holding_scans = self.holding_scans and not restarted
                    elif frames > hold_frames:
                        self.holding_scans = True
                except (sqlite3.Error, OSError) as exc:
                    error = (
                        describe_sqlite_error(exc) if isinstance(exc, sqlite3.Error) else str(exc)
                    )
                    logger.warning("checkpoint failed", extra={"error": error})
                # Let commits accumulate a little: a page written many times in that
                # while is copied back once.
                self.stopping.wait(timeout=CHECKPOINT_INTERVAL_SECONDS)
        finally:
            os.close(database)
            conn.close()

    def _catch_up(self, conn: sqlite3.Connection, database: int, frames: int) -> None:
        """Before a RESTART: copy back, without holding commits, what was appended since
        the last PASSIVE, until little is (the RESTART copies and fsyncs the rest while
        commits wait, so its time follows what is left)."""
        for _ in range(CATCH_UP_ROUNDS):
            os.fsync(database)
            _busy, now, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            appended, frames = now - frames, now
            if appended <= CATCH_UP_FRAMES:
                break
        os.fsync(database)

    def _restart(self, conn: sqlite3.Connection) -> bool:
        if self.restart is not None:
            return bool(self.restart(RESTART_WAIT_SECONDS))
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        return not busy

    def stop(self) -> None:
        self.stopping.set()
        self.committed.set()
        self.join()
