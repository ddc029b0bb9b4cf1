"""`make bench`: this service beside a naive reference and a raw-ASGI floor, side by side.

Every load runs against a real server process over loopback, driven by wrk with pre-signed
bodies. The servers take turns within each pass (the order rotates from pass to pass), and
the table reports medians over the passes and ratios between servers measured in the same
run: absolute numbers on a shared 2-core machine vary, ratios much less.

    python -m bench.run [--passes 3] [--duration 5] [--rows 100000] [--million]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.dataset import RARE_WORD, prefill_naive, prefill_service, write_signed_bodies
from tests.support.postgres import running_cluster, why_unavailable

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SECRET = "bench-secret"
PYTHON = sys.executable


@dataclass(frozen=True)
class Variant:
    name: str
    argv: list[str]
    log: bool
    queries: bool  # serves GET /messages and /stats
    env: dict[str, str] = field(default_factory=dict)


VARIANTS = {
    "service": Variant("service", [PYTHON, "-m", "app", "serve"], log=True, queries=True),
    # The same, without the per-request access line: what that line costs.
    "quiet": Variant(
        "quiet",
        [PYTHON, "-m", "app", "serve"],
        log=True,
        queries=True,
        env={"LOG_LEVEL": "WARNING"},
    ),
    "naive": Variant("naive", [PYTHON, "-m", "uvicorn", "bench.naive:app"], log=True, queries=True),
    "floor": Variant(
        "floor",
        [
            PYTHON,
            "-m",
            "uvicorn",
            "--factory",
            "bench.floor:create_app",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        log=False,
        queries=False,
    ),
}
# The first floor: no aggregates and no index beyond the primary key (see bench/floor.py).
VARIANTS["floor-bare"] = Variant(
    "floor-bare", VARIANTS["floor"].argv, log=False, queries=False, env={"FLOOR_SCHEMA": "bare"}
)


@dataclass
class Server:
    variant: Variant
    process: subprocess.Popen[bytes]
    port: int
    db: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far, all threads."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> tuple[float, float]:
        """(current, peak) resident set size in MB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        values = {
            line.split(":")[0]: int(line.split()[1]) / 1024
            for line in status.splitlines()
            if line.startswith(("VmRSS", "VmHWM"))
        }
        return values["VmRSS"], values["VmHWM"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serve(
    variant: Variant,
    workdir: Path,
    db: Path,
    database_url: str | None = None,
    cwd: Path | None = None,
) -> Iterator[Server]:
    port = free_port()
    env = {
        **os.environ,
        "WEBHOOK_SECRET": SECRET,
        "DATABASE_URL": database_url or f"sqlite:///{db}",
        "LOG_LEVEL": "INFO",
        **variant.env,
    }
    log = workdir / f"{variant.name}-{port}.log"
    argv = [*variant.argv, "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, cwd=cwd or ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    server = Server(variant, process, port, db, log)
    try:
        wait_until_up(server)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_up(server: Server) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.variant.name} exited: see {server.log}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{server.variant.name} did not start")


@dataclass
class Load:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int = 0
    acked: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    server_ms: float | None = None
    # Server CPU time (all threads) per request, in microseconds: efficiency, which a
    # busy machine disturbs less than throughput.
    cpu_us: float | None = None


def start_wrk(
    url: str,
    *,
    connections: int,
    duration: float,
    result: Path,
    bodies: Path | None = None,
    threads: int | None = None,
    script_name: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    threads = threads or (1 if connections == 1 else 2)
    result.unlink(missing_ok=True)
    script = BENCH / (script_name or ("post.lua" if bodies else "get.lua"))
    env = {**os.environ, "RESULT": str(result), "NTHREADS": str(threads), **(extra_env or {})}
    if bodies:
        env["BODIES"] = str(bodies)
    return subprocess.Popen(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def finish_wrk(process: subprocess.Popen[bytes], result: Path) -> dict[str, Any]:
    _, errors = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed: {errors.decode(errors='replace')[-500:]}")
    data: dict[str, Any] = json.loads(result.read_text())
    return data


def wrk(
    url: str,
    *,
    connections: int,
    duration: float,
    workdir: Path,
    bodies: Path | None = None,
    server: Server | None = None,
) -> Load:
    result = workdir / "wrk-result.json"
    cpu_before = server.cpu_seconds() if server else 0.0
    process = start_wrk(
        url, connections=connections, duration=duration, result=result, bodies=bodies
    )
    data = finish_wrk(process, result)
    cpu_us = None
    if server is not None and data["requests"]:
        cpu_us = (server.cpu_seconds() - cpu_before) / data["requests"] * 1e6
    return Load(
        cpu_us=cpu_us,
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        errors=data["errors"],
        acked=data.get("acked", []),
        statuses=data.get("statuses", {}),
    )


def stored_ids(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {row[0] for row in conn.execute("SELECT message_id FROM messages")}
    finally:
        conn.close()


def check_acked(name: str, load: Load, db: Path) -> None:
    stored = stored_ids(db)
    lost = [mid for mid in load.acked if mid not in stored]
    if lost:
        raise SystemExit(f"{name}: {len(lost)} acknowledged messages are not stored: {lost[:5]}")


def fresh_inserts(
    server: Server, bodies: Path, prefix: str, connections: int, args: argparse.Namespace
) -> Load:
    """New signed messages for `args.duration` s; every acknowledged one must be stored."""
    write_signed_bodies(bodies, prefix, args.fresh_bodies, SECRET.encode())
    load = wrk(
        server.url,
        connections=connections,
        duration=args.duration,
        workdir=bodies.parent,
        bodies=bodies,
        server=server,
    )
    check_acked(server.variant.name, load, server.db)
    return load


def settled_log_size(server: Server) -> int:
    """The log's size once the service has flushed what it buffered (within 0.2 s)."""
    time.sleep(0.4)
    return server.log.stat().st_size


def server_time_ms(log: Path, offset: int, path: str) -> float | None:
    """Median latency_ms the service itself logged for `path` after byte `offset`."""
    time.sleep(0.4)  # the last lines of the load reach the file within 0.2 s
    values = []
    with open(log, "rb") as lines:
        lines.seek(offset)
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("path") == path and "latency_ms" in entry:
                values.append(entry["latency_ms"])
    return statistics.median(values) if values else None


@dataclass
class Table:
    rows: dict[tuple[str, str], list[Load]] = field(default_factory=dict)

    def add(self, load_name: str, variant: str, load: Load) -> None:
        self.rows.setdefault((load_name, variant), []).append(load)

    def median(self, load_name: str, variant: str, attr: str) -> float | None:
        loads = self.rows.get((load_name, variant))
        if not loads:
            return None
        values = [getattr(load, attr) for load in loads if getattr(load, attr) is not None]
        return statistics.median(values) if values else None


def run_ingest(args: argparse.Namespace, workdir: Path, table: Table) -> None:
    names = [name for name in args.variants if name in VARIANTS]
    for pass_index in range(args.passes):
        order = names[pass_index % len(names) :] + names[: pass_index % len(names)]
        for name in order:
            variant = VARIANTS[name]
            run_dir = workdir / f"ingest-{pass_index}-{name}"
            run_dir.mkdir()
            db = run_dir / "app.db"
            with serve(variant, run_dir, db) as server:
                fresh = run_dir / "fresh.txt"
                load = fresh_inserts(server, fresh, f"f{pass_index}{name}-", 64, args)
                table.add("insert, 64 conn", name, load)
                single = run_dir / "single.txt"
                load = fresh_inserts(server, single, f"s{pass_index}{name}-", 1, args)
                table.add("insert, 1 conn", name, load)
                # Duplicates: the first bodies of the fresh load, stored already.
                dups = run_dir / "dups.txt"
                with open(fresh) as source, open(dups, "w") as out:
                    for _, line in zip(range(5000), source, strict=False):
                        out.write(line)
                load = wrk(
                    server.url,
                    connections=64,
                    duration=args.duration,
                    workdir=run_dir,
                    bodies=dups,
                    server=server,
                )
                table.add("duplicate, 64 conn", name, load)
            print(f"  pass {pass_index + 1}: {name} ingest done", file=sys.stderr)


QUERY_LOADS: list[tuple[str, Callable[[int], str]]] = [
    ("GET /messages first page", lambda rows: "/messages?limit=50"),
    ("GET /messages offset deep", lambda rows: f"/messages?limit=50&offset={rows - 100}"),
    ("GET /stats", lambda rows: "/stats"),
    ("GET /messages?q= (rare term)", lambda rows: f"/messages?q={RARE_WORD}"),
    ("GET /messages?q= (common term)", lambda rows: "/messages?q=meeting"),
]


def run_queries(args: argparse.Namespace, workdir: Path, table: Table, rows: int) -> None:
    names = [name for name in ("service", "naive") if name in args.variants]
    sources = {}
    for name in names:
        source = workdir / f"{name}-prefill.db"
        (prefill_service if name == "service" else prefill_naive)(source, rows)
        sources[name] = source
    for pass_index in range(args.passes):
        order = names if pass_index % 2 == 0 else names[::-1]
        for name in order:
            for load_index, (label, path) in enumerate(QUERY_LOADS):
                run_dir = workdir / f"query-{pass_index}-{name}-{load_index}"
                run_dir.mkdir()
                db = run_dir / "app.db"
                shutil.copy(sources[name], db)
                # A fresh server per load: a slow server still working through the last
                # load's queue would otherwise be charged for it in the next one.
                with serve(VARIANTS[name], run_dir, db) as server:
                    for connections in (1, 64):
                        offset = settled_log_size(server)
                        load = wrk(
                            server.url + path(rows),
                            connections=connections,
                            duration=args.query_duration,
                            workdir=run_dir,
                            server=server,
                        )
                        if name == "service":
                            load.server_ms = server_time_ms(
                                server.log, offset, "/messages" if "messages" in label else "/stats"
                            )
                        table.add(f"{label}, {connections} conn", name, load)
            print(f"  pass {pass_index + 1}: {name} queries done", file=sys.stderr)


def run_million(args: argparse.Namespace, workdir: Path) -> list[str]:
    """The service alone at 1M rows: query latency, insert rate beside an empty store, RSS."""
    lines = []
    rows = args.million_rows
    started = time.monotonic()
    source = workdir / "million.db"
    prefill_service(source, rows)
    lines.append(f"prefilled {rows:,} messages (10k senders) in {time.monotonic() - started:.0f} s")
    table = Table()
    rss = []
    for pass_index in range(args.passes):
        for kind in ("full", "empty") if pass_index % 2 == 0 else ("empty", "full"):
            run_dir = workdir / f"million-{pass_index}-{kind}"
            run_dir.mkdir()
            db = run_dir / "app.db"
            if kind == "full":
                shutil.copy(source, db)
            with serve(VARIANTS["service"], run_dir, db) as server:
                if kind == "full":
                    cursor = first_cursor(server.url)
                    loads = [
                        ("GET /stats", "/stats"),
                        ("GET /messages first page", "/messages?limit=50"),
                        ("GET /messages keyset page", f"/messages?limit=50&cursor={cursor}"),
                        ("GET /messages offset 500k", "/messages?limit=50&offset=500000"),
                        ("GET /messages?q= (rare term)", f"/messages?q={RARE_WORD}"),
                        ("GET /messages?from=", "/messages?from=%2B15550000042"),
                    ]
                    for label, path in loads:
                        offset = settled_log_size(server)
                        load = wrk(
                            server.url + path,
                            connections=1,
                            duration=args.query_duration,
                            workdir=run_dir,
                        )
                        load.server_ms = server_time_ms(
                            server.log, offset, "/stats" if "stats" in label else "/messages"
                        )
                        table.add(label, "1M", load)
                load = fresh_inserts(
                    server, run_dir / "fresh.txt", f"m{pass_index}{kind}-", 64, args
                )
                table.add("insert, 64 conn", kind, load)
                if kind == "full":
                    rss.append(server.rss_mb())
        print(f"  pass {pass_index + 1}: 1M done", file=sys.stderr)
    lines.append("")
    lines.append(
        f"{'at ' + format(rows, ',') + ' rows, 1 connection':<34}"
        f"{'server ms':>10}{'client p50':>11}{'client p99':>11}"
    )
    for (label, _), _loads in table.rows.items():
        if label.startswith("GET"):
            lines.append(
                f"{label:<34}{fmt(table.median(label, '1M', 'server_ms'), 3):>10}"
                f"{fmt(table.median(label, '1M', 'p50_ms'), 2):>11}"
                f"{fmt(table.median(label, '1M', 'p99_ms'), 2):>11}"
            )
    full = table.median("insert, 64 conn", "full", "rps")
    empty = table.median("insert, 64 conn", "empty", "rps")
    if full and empty:
        lines.append(
            f"inserts/s at 64 conn: empty store {empty:,.0f}, at {rows:,} rows "
            f"{full:,.0f} ({full / empty:.0%} of empty)"
        )
    if rss:
        current = statistics.median(r[0] for r in rss)
        peak = statistics.median(r[1] for r in rss)
        lines.append(f"service RSS after the 1M loads: {current:.0f} MB (peak {peak:.0f} MB)")
    return lines


def run_scaleout(args: argparse.Namespace, workdir: Path) -> list[str]:
    """SQLite beside PostgreSQL with one and with two API processes, in one run.

    The same 64 connections each time, from two wrk processes: both at the one server,
    or one at each replica (as a load balancer would spread them).
    """
    reason = why_unavailable()
    if reason:
        return [f"scale-out: skipped ({reason})"]
    with running_cluster() as cluster:
        table = Table()
        kinds = ["sqlite", "postgresql x1", "postgresql x2"]
        for pass_index in range(args.passes):
            order = kinds[pass_index % 3 :] + kinds[: pass_index % 3]
            for kind in order:
                run_dir = workdir / f"scale-{pass_index}-{kind.replace(' ', '')}"
                run_dir.mkdir()
                db = run_dir / "app.db"
                url = None if kind == "sqlite" else cluster.create_database("bench")
                replicas = 2 if kind.endswith("x2") else 1
                with contextlib.ExitStack() as stack:
                    servers = [
                        stack.enter_context(serve(VARIANTS["service"], run_dir, db, url))
                        for _ in range(replicas)
                    ]
                    runs = []
                    for index in range(2):
                        bodies = run_dir / f"bodies-{index}.txt"
                        write_signed_bodies(
                            bodies,
                            f"x{pass_index}{index}{kind[0]}{replicas}-",
                            args.fresh_bodies // 2,
                            SECRET.encode(),
                        )
                        result = run_dir / f"wrk-{index}.json"
                        target = servers[index % replicas].url
                        runs.append(
                            (
                                start_wrk(
                                    target,
                                    connections=32,
                                    duration=args.duration,
                                    result=result,
                                    bodies=bodies,
                                    threads=1,
                                ),
                                result,
                            )
                        )
                    results = [finish_wrk(process, result) for process, result in runs]
                acked = [mid for data in results for mid in data["acked"]]
                stored = (
                    stored_ids(db)
                    if url is None
                    else {
                        row[0]
                        for row in cluster.fetch(
                            "SELECT message_id FROM messages", database=url.rsplit("/", 1)[1]
                        )
                    }
                )
                lost = [mid for mid in acked if mid not in stored]
                if lost:
                    raise SystemExit(f"{kind}: {len(lost)} acknowledged messages are not stored")
                requests = sum(data["requests"] for data in results)
                seconds = max(data["duration_us"] for data in results) / 1e6
                table.add(
                    "insert, 64 conn",
                    kind,
                    Load(
                        rps=requests / seconds,
                        p50_ms=max(data["p50_us"] for data in results) / 1000,
                        p99_ms=max(data["p99_us"] for data in results) / 1000,
                    ),
                )
            print(f"  pass {pass_index + 1}: scale-out done", file=sys.stderr)
    lines = [
        f"{'fresh inserts, 64 connections':<34}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'vs SQLite':>11}"
    ]
    base = table.median("insert, 64 conn", "sqlite", "rps")
    for kind in kinds:
        rps = table.median("insert, 64 conn", kind, "rps")
        lines.append(
            f"{kind:<34}{fmt(rps):>10}{fmt(table.median('insert, 64 conn', kind, 'p50_ms'), 1):>9}"
            f"{fmt(table.median('insert, 64 conn', kind, 'p99_ms'), 1):>9}"
            f"{(rps / base if rps and base else 0):>10.2f}x"
        )
    return lines


def first_cursor(url: str) -> str:
    with urllib.request.urlopen(url + "/messages?limit=50", timeout=30) as response:  # noqa: S310
        cursor: str = json.loads(response.read())["next_cursor"]
        return cursor


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report(table: Table, variants: list[str]) -> list[str]:
    lines = []
    header = f"{'load':<40}" + "".join(f"{name + ' req/s':>18}" for name in variants)
    header += "".join(f"{name[:10] + ' cpu us':>18}" for name in variants)
    header += f"{'svc p50 ms':>11}{'svc p99 ms':>11}{'svc srv ms':>11}"
    ratios = [
        (a, b)
        for a, b in (
            ("service", "naive"),
            ("service", "floor"),
            ("quiet", "floor"),
            ("service", "floor-bare"),
        )
        if a in variants and b in variants
    ]
    header += "".join(f"{a[:3]}/{b}".rjust(15) for a, b in ratios)
    lines.append(header)
    labels = list(dict.fromkeys(label for label, _ in table.rows))
    for label in labels:
        line = f"{label:<40}"
        for name in variants:
            line += f"{fmt(table.median(label, name, 'rps')):>18}"
        for name in variants:
            line += f"{fmt(table.median(label, name, 'cpu_us'), 1):>18}"
        line += f"{fmt(table.median(label, 'service', 'p50_ms'), 2):>11}"
        line += f"{fmt(table.median(label, 'service', 'p99_ms'), 2):>11}"
        line += f"{fmt(table.median(label, 'service', 'server_ms'), 3):>11}"
        for a, b in ratios:
            top, bottom = table.median(label, a, "rps"), table.median(label, b, "rps")
            line += f"{top / bottom:>14.2f}x" if top and bottom else f"{'-':>15}"
        lines.append(line)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5, help="seconds per insert load")
    parser.add_argument("--query-duration", type=float, default=3)
    parser.add_argument("--rows", type=int, default=100_000, help="rows for the query loads")
    parser.add_argument("--fresh-bodies", type=int, default=250_000)
    parser.add_argument("--million", action="store_true", help="also measure at 1M rows")
    parser.add_argument("--million-rows", type=int, default=1_000_000)
    parser.add_argument(
        "--scale-out",
        action="store_true",
        help="also SQLite beside PostgreSQL with 1 and 2 API processes",
    )
    parser.add_argument("--variants", default="service,naive,floor,floor-bare")
    parser.add_argument("--skip", default="", help="comma list: ingest,queries")
    args = parser.parse_args()
    args.variants = args.variants.split(",")
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    skip = set(args.skip.split(","))
    output = [
        f"machine: {os.cpu_count()} cores, {os.uname().machine}, Python "
        f"{sys.version.split()[0]}; {args.passes} passes, medians"
    ]
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        table = Table()
        if "ingest" not in skip:
            run_ingest(args, workdir, table)
        if "queries" not in skip:
            run_queries(args, workdir, table, args.rows)
        output += report(table, args.variants)
        if args.million:
            output.append("")
            output += run_million(args, workdir)
        if args.scale_out:
            output.append("")
            output += run_scaleout(args, workdir)
    print("\n".join(output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
