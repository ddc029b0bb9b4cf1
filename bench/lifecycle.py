"""`make bench-lifecycle` (also the last part of `make bench`): the data lifecycle at scale.

- Export of a million messages: `python -m app export` (one snapshot, straight from the
  file) and GET /messages/export (streamed by pages): time, rate and peak RSS.
- Import of that export into an empty store: SQLite, and PostgreSQL when its binaries are
  installed (the two-command move of docs/lifecycle.md): time, rate and peak RSS.
- A retention purge of half a million rows while 64 connections ingest: ingest p50/p99
  during the purge beside the same load on the same store without one (the order
  alternates from pass to pass), and the time of each purge batch alone, which is the
  longest an insert can wait behind one.
- The pauses of ingest during a purge, in process (bench/pauses.py): the longest gaps
  between two inserts' completions with 64 inserters, without a purge and during one.
- The insert path on a store holding half a million tombstones beside the same store
  without them: what the tombstone check costs.
- With --baseline REF (a git ref, e.g. main before this feature): REF's service beside
  this one on the same fresh-insert load, in the same run.

    python -m bench.lifecycle [--passes 3] [--rows 1000000] [--purge-rows 500000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from app.config import Settings
from app.metrics import Metrics
from app.retention import Retention
from app.storage import Lifecycle
from app.storage.sqlite.store import SQLiteStore
from bench.dataset import prefill_service
from bench.pauses import ingest_pauses
from bench.run import PYTHON, ROOT, Load, Variant, fmt, fresh_inserts, serve
from tests.support.postgres import running_cluster, why_unavailable

SERVICE = Variant("service", [PYTHON, "-m", "app", "serve"], log=True, queries=True)
OLD = "2020-01-01T00:00:00.000000Z"


def measure(argv: list[str], env: dict[str, str], stdout: Path | None) -> tuple[float, float, str]:
    """Run a command; (seconds, its peak RSS in MB, what it wrote on stderr)."""
    started = time.monotonic()
    with open(stdout or os.devnull, "wb") as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - started
        err.seek(0)
        message = err.read().decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv[-3:])} failed: {message[-500:]}")
    return seconds, usage.ru_maxrss / 1024, message


def env_for(database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "WEBHOOK_SECRET")}
    return {**env, "DATABASE_URL": database_url, **extra}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_export_import(args: argparse.Namespace, workdir: Path, source: Path) -> list[str]:
    rows = args.rows
    cli, http, sqlite_import, pg_import = [], [], [], []
    dump = workdir / "all.ndjson"
    for pass_index in range(args.passes):
        cli.append(
            measure([PYTHON, "-m", "app", "export"], env_for(f"sqlite:///{source}"), dump)[:2]
        )
        with serve(SERVICE, workdir, source) as server:
            started = time.monotonic()
            size = 0
            with urllib.request.urlopen(server.url + "/messages/export", timeout=600) as reply:  # noqa: S310
                while chunk := reply.read(1 << 20):
                    size += len(chunk)
            seconds = time.monotonic() - started
            http.append((seconds, server.rss_mb()[1], size))
        target = workdir / f"import-{pass_index}.db"
        seconds, rss, _ = measure(
            [PYTHON, "-m", "app", "import", str(dump)], env_for(f"sqlite:///{target}"), None
        )
        sqlite_import.append((seconds, rss))
        target.unlink()
        print(f"  pass {pass_index + 1}: export and import done", file=sys.stderr)
    lines = [
        f"{'export and import of ' + format(rows, ',') + ' messages':<44}"
        f"{'seconds':>9}{'rows/s':>10}{'peak RSS MB':>13}"
    ]

    def line(label: str, runs: list[tuple[float, float]]) -> str:
        seconds = median([r[0] for r in runs])
        return (
            f"{label:<44}{fmt(seconds, 1):>9}{fmt(rows / seconds):>10}"
            f"{fmt(median([r[1] for r in runs])):>13}"
        )

    lines.append(line("python -m app export (SQLite, to a file)", cli))
    lines.append(line("GET /messages/export (service RSS)", [(s, rss) for s, rss, _ in http]))
    lines.append(line("python -m app import (into empty SQLite)", sqlite_import))
    if why_unavailable() is None and not args.no_postgres:
        with running_cluster() as cluster:
            for _ in range(args.passes):
                url = cluster.create_database("imported")
                pg_import.append(
                    measure([PYTHON, "-m", "app", "import", str(dump)], env_for(url), None)[:2]
                )
        lines.append(line("python -m app import (into empty PostgreSQL)", pg_import))
    lines.append(f"export file: {dump.stat().st_size / 1e6:,.0f} MB")
    return lines


def age_half(source: Path, target: Path, old_rows: int) -> None:
    """A copy of `source` whose first `old_rows` rows were received long ago."""
    shutil.copy(source, target)
    conn = sqlite3.connect(target, isolation_level=None)
    try:
        conn.execute("UPDATE messages SET created_at = ? WHERE rowid <= ?", (OLD, old_rows))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def purge_log(log: Path, deadline: float) -> dict[str, float] | None:
    while time.monotonic() < deadline:
        for raw in log.read_bytes().splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if entry.get("msg") == "retention purge":
                return entry  # type: ignore[no-any-return]
        time.sleep(0.5)
    return None


class TimedPurges:
    """The store's lifecycle, with the time and size of each purge batch noted."""

    def __init__(self, inner: Lifecycle) -> None:
        self.inner = inner
        self.batches: list[tuple[int, float]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def purge(self, older_than: timedelta, tombstone_for: timedelta, limit: int) -> int:
        began = time.perf_counter()
        count = await self.inner.purge(older_than, tombstone_for, limit)
        self.batches.append((limit, (time.perf_counter() - began) * 1000))
        return count


async def batch_times(db: Path) -> tuple[list[tuple[int, float]], int, float]:
    """Each purge batch's size and time, alone: what an insert queued behind one waits."""
    store = await SQLiteStore.open(str(db))
    timed = TimedPurges(store.lifecycle)
    store.lifecycle = timed  # type: ignore[assignment]
    settings = Settings(webhook_secret=SecretStr("bench"), retention_days=30)
    started = time.monotonic()
    try:
        purged, _ = await Retention(store, settings, Metrics()).run_once()
    finally:
        await store.close()
    return timed.batches, purged, time.monotonic() - started


def run_purge(args: argparse.Namespace, workdir: Path, source: Path) -> list[str]:
    aged = workdir / "aged.db"
    age_half(source, aged, args.purge_rows)
    loads: dict[str, list[Load]] = {"without a purge": [], "during the purge": []}
    purges = []
    for pass_index in range(args.passes):
        kinds = list(loads) if pass_index % 2 == 0 else list(reversed(loads))
        for kind in kinds:
            run_dir = workdir / f"purge-{pass_index}-{len(loads[kind])}-{kind[:6]}"
            run_dir.mkdir()
            db = run_dir / "app.db"
            shutil.copy(aged, db)
            purging = kind == "during the purge"
            variant = Variant(
                "service",
                SERVICE.argv,
                log=True,
                queries=True,
                env={"RETENTION_DAYS": "30"} if purging else {},
            )
            with serve(variant, run_dir, db) as server:
                load = fresh_inserts(
                    server, run_dir / "fresh.txt", f"p{pass_index}{kind[:3]}", 64, args
                )
                loads[kind].append(load)
                if purging:
                    entry = purge_log(server.log, time.monotonic() + 600)
                    if entry is not None:
                        purges.append((entry["purged"], entry["seconds"]))
            shutil.rmtree(run_dir)
        print(f"  pass {pass_index + 1}: purge under load done", file=sys.stderr)
    pauses = ingest_pauses(aged, workdir, 20, args.passes)
    alone = workdir / "alone.db"
    shutil.copy(aged, alone)
    batches, purged, seconds = asyncio.run(batch_times(alone))
    times = [took for _, took in batches]
    tombstoned = alone
    bare = workdir / "bare.db"
    shutil.copy(tombstoned, bare)
    # The same file less its tombstones (not vacuumed: the messages pages stay as they are).
    conn = sqlite3.connect(bare, isolation_level=None)
    conn.execute("DELETE FROM tombstones")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    checks: dict[str, list[Load]] = {"500k tombstones": [], "no tombstones": []}
    for pass_index in range(args.passes):
        kinds = list(checks) if pass_index % 2 == 0 else list(reversed(checks))
        for kind in kinds:
            run_dir = workdir / f"tomb-{pass_index}-{kind[:2]}"
            run_dir.mkdir()
            db = run_dir / "app.db"
            shutil.copy(tombstoned if kind.startswith("500k") else bare, db)
            with serve(SERVICE, run_dir, db) as server:
                checks[kind].append(
                    fresh_inserts(
                        server, run_dir / "fresh.txt", f"t{pass_index}{kind[:2]}", 64, args
                    )
                )
            shutil.rmtree(run_dir)
    lines = [
        f"{'fresh inserts, 64 conn, ' + format(args.rows, ',') + ' rows':<44}"
        f"{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'cpu us':>9}"
    ]
    for table in (loads, checks):
        for kind, runs in table.items():
            lines.append(
                f"{kind:<44}{fmt(median([r.rps for r in runs])):>9}"
                f"{fmt(median([r.p50_ms for r in runs]), 1):>9}"
                f"{fmt(median([r.p99_ms for r in runs]), 1):>9}"
                f"{fmt(median([r.cpu_us or 0 for r in runs]), 1):>9}"
            )
    if purges:
        rate = median([p / s for p, s in purges if s])
        took = median([s for _, s in purges])
        lines.append(
            f"purge of {args.purge_rows:,} rows under that load: {took:.0f} s ({rate:,.0f} rows/s)"
        )
    ordered = sorted(times)
    p99 = ordered[int(len(ordered) * 0.99)]
    lines.append(
        f"purge alone: {purged:,} rows in {seconds:.0f} s ({purged / seconds:,.0f} rows/s),"
        f" {len(batches):,} batches of median {median([float(n) for n, _ in batches]):.0f} rows;"
        f" per batch: median {median(times):.1f} ms, p99 {p99:.1f} ms, max {ordered[-1]:.1f} ms"
    )
    return lines + pauses


def run_baseline(args: argparse.Namespace, workdir: Path) -> list[str]:
    tree = workdir / "baseline"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "archive", args.baseline, "app"], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    # -P: the interpreter does not put the working folder first on sys.path, so `app`
    # comes from PYTHONPATH, the baseline's tree.
    baseline = Variant(
        args.baseline,
        [PYTHON, "-P", "-m", "app", "serve"],
        log=True,
        queries=True,
        env={"PYTHONPATH": str(tree)},
    )
    loads: dict[str, list[Load]] = {args.baseline: [], "this build": []}
    for pass_index in range(args.passes):
        kinds = list(loads) if pass_index % 2 == 0 else list(reversed(loads))
        for kind in kinds:
            run_dir = workdir / f"base-{pass_index}-{kind.replace('/', '_')[:8]}"
            run_dir.mkdir()
            variant = baseline if kind == args.baseline else SERVICE
            with serve(variant, run_dir, run_dir / "app.db") as server:
                loads[kind].append(
                    fresh_inserts(
                        server, run_dir / "fresh.txt", f"b{pass_index}{len(kind)}", 64, args
                    )
                )
            shutil.rmtree(run_dir)
    lines = [f"{'fresh inserts, 64 conn, empty store':<44}{'req/s':>9}{'p99 ms':>9}{'cpu us':>9}"]
    for kind, runs in loads.items():
        lines.append(
            f"{kind:<44}{fmt(median([r.rps for r in runs])):>9}"
            f"{fmt(median([r.p99_ms for r in runs]), 1):>9}"
            f"{fmt(median([r.cpu_us or 0 for r in runs]), 1):>9}"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--purge-rows", type=int, default=500_000)
    parser.add_argument("--duration", type=float, default=10, help="seconds per insert load")
    parser.add_argument("--fresh-bodies", type=int, default=300_000)
    parser.add_argument("--baseline", help="a git ref whose service to measure beside this one")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--skip", default="", help="comma list: export,purge")
    parser.add_argument(
        "--prefilled", type=Path, help="a store bench.dataset.prefill_service made, to reuse"
    )
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    output = [
        f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]};"
        f" {args.passes} passes, medians"
    ]
    with tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as tmp:
        workdir = Path(tmp)
        source = workdir / "million.db"
        started = time.monotonic()
        if args.prefilled:
            shutil.copy(args.prefilled, source)
            with contextlib.closing(sqlite3.connect(source)) as conn:
                (args.rows,) = conn.execute("SELECT count(*) FROM messages").fetchone()
            output.append(f"reused a prefilled store of {args.rows:,} messages")
        else:
            prefill_service(source, args.rows)
            output.append(f"prefilled {args.rows:,} messages in {time.monotonic() - started:.0f} s")
        # Each part is printed as soon as it is measured: a long run that fails late still
        # leaves what it measured.
        print("\n".join(output), flush=True)
        if "export" not in skip:
            print("\n".join(["", *run_export_import(args, workdir, source)]), flush=True)
        if "purge" not in skip:
            print("\n".join(["", *run_purge(args, workdir, source)]), flush=True)
        if args.baseline:
            print("\n".join(["", *run_baseline(args, workdir)]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
