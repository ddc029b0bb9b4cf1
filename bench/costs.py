"""`make bench-costs`: what the cost bounds of docs/limits.md hold under attack.

    python -m bench.costs [--passes 3] [--rows 1000000] [--skip sqlite,postgres,...]
                          [--compare-with DIR]

Every part runs real server processes on 127.0.0.1 and stops by itself:

- **searches**, on SQLite and on PostgreSQL, each on a store of `--rows` messages: a
  steady ingest load alone, then the same load while 64 connections search without end
  for a 2-character `q` that matches nothing (the worst case: a scan of every row).
  Ingest p99 with searches against without (target: within 2x), `/webhook` 503s
  (target: none) and `/health/ready` failures, polled every 100 ms (target: none).
- **slow bodies**: 1,000 connections each sending a 3 MB WhatsApp body slowly,
  reconnecting when refused; the server's peak resident memory (target: under 300 MB).
- **a 3 MB batch**: the longest `/health/live` takes while a WhatsApp batch of 3 MB
  (tens of thousands of messages) is handled (target: under 50 ms).
- **a normal page**, with `--compare-with DIR` (a checkout of another version): the
  server time of `GET /messages?limit=50` at 1 connection, both versions side by side,
  to show what the per-read deadline and disconnect watch cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.main import create_app
from bench.dataset import prefill_postgres, prefill_service, write_signed_bodies
from bench.run import (
    PYTHON,
    SECRET,
    Server,
    Variant,
    finish_wrk,
    fmt,
    serve,
    server_time_ms,
    settled_log_size,
    start_wrk,
)
from tests.support.asgi import longest_loop_work
from tests.support.asgi import run as run_in_app
from tests.support.clients import AppClient, make_settings
from tests.support.meta import hub_signature
from tests.support.postgres import running_cluster, why_unavailable

APP_SECRET = "meta-app-secret"
WHATSAPP = {
    "WHATSAPP_APP_SECRET": APP_SECRET,
    "WHATSAPP_VERIFY_TOKEN": "bench",
    "ALLOW_OPEN_READS": "true",  # loopback only
}
SERVICE = Variant("service", [PYTHON, "-m", "app", "serve"], log=True, queries=True)
# The steady ingest: 16 connections, each a request every 16 ms at most (~1,000/s).
INGEST_CONNECTIONS = 16
INGEST_DELAY_MS = 16
SEARCHES = 64
WORST_SEARCH = "/messages?q=zq"  # two characters, in no message of the dataset


@dataclass
class Phase:
    p99_ms: float
    p50_ms: float
    rps: float
    webhook_503: int
    ready_failures: int
    ready_polls: int
    search_statuses: dict[str, int] = field(default_factory=dict)


class ReadyPoller:
    """GET /health/ready every 100 ms in a thread; counts answers other than 200."""

    def __init__(self, url: str) -> None:
        self.url = url + "/health/ready"
        self.polls = 0
        self.failures = 0
        self.slowest_ms = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:  # noqa: S310
                    ok = response.status == 200
            except (urllib.error.URLError, OSError):
                ok = False
            self.slowest_ms = max(self.slowest_ms, (time.perf_counter() - started) * 1000)
            self.polls += 1
            self.failures += not ok
            self._stop.wait(0.1)

    def __enter__(self) -> ReadyPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def steady_ingest(server: Server, workdir: Path, prefix: str, seconds: float) -> dict[str, Any]:
    bodies = workdir / f"{prefix}.txt"
    write_signed_bodies(bodies, prefix, 40_000, SECRET.encode())
    result = workdir / f"{prefix}.json"
    process = start_wrk(
        server.url,
        connections=INGEST_CONNECTIONS,
        duration=seconds,
        result=result,
        bodies=bodies,
        extra_env={"DELAY_MS": str(INGEST_DELAY_MS)},
    )
    return finish_wrk(process, result)


def phase(server: Server, workdir: Path, name: str, seconds: float, searching: bool) -> Phase:
    search = None
    search_result = workdir / f"{name}-search.json"
    with ReadyPoller(server.url) as ready:
        if searching:
            search = start_wrk(
                server.url + WORST_SEARCH,
                connections=SEARCHES,
                duration=seconds + 4,
                result=search_result,
                script_name="search.lua",
            )
            time.sleep(2)  # every search connection busy before the ingest starts
        data = steady_ingest(server, workdir, name, seconds)
        statuses = {}
        if search is not None:
            statuses = finish_wrk(search, search_result)["statuses"]
    return Phase(
        p99_ms=data["p99_us"] / 1000,
        p50_ms=data["p50_us"] / 1000,
        rps=data["requests"] / (data["duration_us"] / 1e6),
        webhook_503=int(data["statuses"].get("503", 0)),
        ready_failures=ready.failures,
        ready_polls=ready.polls,
        search_statuses=statuses,
    )


def run_searches(
    backend: str, args: argparse.Namespace, workdir: Path, source: Path | None, url: str | None
) -> list[str]:
    idle: list[Phase] = []
    loaded: list[Phase] = []
    variant = Variant(
        "service",
        SERVICE.argv,
        log=True,
        queries=True,
        env=dict(item.split("=", 1) for item in args.env),
    )
    for index in range(args.passes):
        run_dir = workdir / f"{backend}-{index}"
        run_dir.mkdir()
        db = run_dir / "app.db"
        if source is not None:
            shutil.copy(source, db)
        with serve(variant, run_dir, db, url) as server:
            steady_ingest(server, run_dir, f"warm{index}", 3)
            order = [False, True] if index % 2 == 0 else [True, False]
            for searching in order:
                name = f"{'loaded' if searching else 'idle'}{index}"
                result = phase(server, run_dir, name, args.duration, searching)
                (loaded if searching else idle).append(result)
                time.sleep(6)  # the last searches end at their deadline
        print(f"  {backend}: pass {index + 1} done", file=sys.stderr)
    idle_p99 = statistics.median(p.p99_ms for p in idle)
    loaded_p99 = statistics.median(p.p99_ms for p in loaded)
    statuses: dict[str, int] = {}
    for p in loaded:
        for status, count in p.search_statuses.items():
            statuses[status] = statuses.get(status, 0) + count
    settings = f" ({' '.join(args.env)})" if args.env else ""
    return [
        f"{backend}{settings}, {args.rows:,} rows: steady ingest ({INGEST_CONNECTIONS} connections,"
        f" ~{INGEST_CONNECTIONS * 1000 // INGEST_DELAY_MS}/s) alone, then beside"
        f" {SEARCHES} connections searching {WORST_SEARCH}",
        f"  ingest p99 alone {fmt(idle_p99, 2)} ms, with searches {fmt(loaded_p99, 2)} ms:"
        f" {loaded_p99 / idle_p99:.2f}x (target: at most 2x);"
        f" p50 {fmt(statistics.median(p.p50_ms for p in idle), 2)} /"
        f" {fmt(statistics.median(p.p50_ms for p in loaded), 2)} ms",
        f"  /webhook 503s: {sum(p.webhook_503 for p in idle + loaded)} (target: 0);"
        f" /health/ready failures: {sum(p.ready_failures for p in idle + loaded)}"
        f" of {sum(p.ready_polls for p in idle + loaded)} polls (target: 0)",
        f"  search answers, all passes: {json.dumps(statuses, sort_keys=True)}",
    ]


async def slow_bodies(url: str, connections: int, seconds: float) -> dict[str, int]:
    """`connections` clients each sending a 3 MB WhatsApp body 64 kB every half second,
    starting over whenever the server answers or closes."""
    host, port = url.removeprefix("http://").split(":")
    size = 3 * 1024 * 1024
    head = (
        f"POST /webhook/whatsapp HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"X-Hub-Signature-256: {hub_signature(b'not this body', APP_SECRET)}\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    chunk = b"x" * 65536
    counts = {"opened": 0, "answered": 0, "503": 0, "failed": 0}
    deadline = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < deadline:
            writer = None
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
                counts["opened"] += 1
                writer.write(head)
                sent = 0
                while sent < size and time.monotonic() < deadline:
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)
                    with contextlib.suppress(TimeoutError):
                        answer = await asyncio.wait_for(reader.read(200), 0.5)
                        if answer:
                            counts["answered"] += 1
                            counts["503"] += answer.startswith(b"HTTP/1.1 503")
                        break
            except OSError:
                counts["failed"] += 1
                await asyncio.sleep(0.2)
            finally:
                if writer is not None:
                    writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return counts


def run_slow_bodies(args: argparse.Namespace, workdir: Path) -> list[str]:
    run_dir = workdir / "slow-bodies"
    run_dir.mkdir()
    variant = Variant("service", SERVICE.argv, log=True, queries=True, env=WHATSAPP)
    with serve(variant, run_dir, run_dir / "app.db") as server:
        baseline = server.rss_mb()[0]
        samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(server.rss_mb()[0])
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        counts = asyncio.run(slow_bodies(server.url, 1000, args.slow_seconds))
        stop.set()
        sampler.join()
        peak = server.rss_mb()[1]
    return [
        f"1,000 slow connections, each a 3 MB WhatsApp body at 128 kB/s, for"
        f" {args.slow_seconds:.0f} s: server RSS {baseline:.0f} MB before, peak {peak:.0f} MB"
        f" (target: under 300 MB), median {statistics.median(samples):.0f} MB while they ran",
        f"  connections opened {counts['opened']:,}, answered {counts['answered']:,}"
        f" ({counts['503']:,} of them 503), failed to connect or reset {counts['failed']:,}",
    ]


def live_latencies(url: str, stop: threading.Event, into: list[float]) -> None:
    """GET /health/live back to back on one keep-alive connection."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    while not stop.is_set():
        started = time.perf_counter()
        conn.request("GET", "/health/live")
        conn.getresponse().read()
        into.append((time.perf_counter() - started) * 1000)
        time.sleep(0.002)
    conn.close()


def big_batch(round_: int) -> bytes:
    """Tiny text messages, as many as 3 MB holds; ids unique to the round."""
    item = {"from": "16315551234", "timestamp": "1603059201", "type": "text", "text": {"body": "x"}}
    ids = [f"r{round_:02d}w{n:06d}" for n in range(100_000)]
    per = len(json.dumps({**item, "id": ids[0]}, separators=(",", ":"))) + 1
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": "1"},
        "messages": [{**item, "id": ids[n]} for n in range(3 * 1024 * 1024 // per - 200)],
    }
    change = {"field": "messages", "value": value}
    payload = {"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [change]}]}
    return json.dumps(payload, separators=(",", ":")).encode()


def run_big_batch(args: argparse.Namespace, workdir: Path) -> list[str]:
    run_dir = workdir / "big-batch"
    run_dir.mkdir()
    variant = Variant("service", SERVICE.argv, log=True, queries=True, env=WHATSAPP)
    messages = big_batch(0).count(b'"type":"text"')
    worst: list[float] = []
    quiet: list[float] = []
    with serve(variant, run_dir, run_dir / "app.db") as server:
        for round_ in range(args.passes + 2):
            body = big_batch(round_)
            latencies: list[float] = []
            stop = threading.Event()
            prober = threading.Thread(target=live_latencies, args=(server.url, stop, latencies))
            prober.start()
            time.sleep(0.5)
            before = len(latencies)
            request = urllib.request.Request(  # noqa: S310 - loopback only
                server.url + "/webhook/whatsapp",
                data=body,
                headers={"X-Hub-Signature-256": hub_signature(body, APP_SECRET)},
            )
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
                assert response.status == 200
            stop.set()
            prober.join()
            quiet.append(max(latencies[:before]))
            worst.append(max(latencies[before:]))
    work = loop_work_in_process(args.passes + 2, run_dir)
    return [
        f"a WhatsApp batch of 3 MB ({messages:,} messages), {len(worst)} times: the slowest"
        f" /health/live meanwhile, median {statistics.median(worst):.1f} ms, worst"
        f" {max(worst):.1f} ms (target: under 50 ms);"
        f" without a batch {statistics.median(quiet):.1f} ms",
        f"  the longest the event loop worked without a turn for others, in CPU time (in"
        f" process): median {statistics.median(work) * 1000:.1f} ms, worst"
        f" {max(work) * 1000:.1f} ms",
    ]


def loop_work_in_process(rounds: int, workdir: Path) -> list[float]:
    """The same batch through the app in this process (no server): CPU time, which the
    machine's other work does not inflate, of the longest stretch without a turn."""
    settings = make_settings(
        database_url=f"sqlite:///{workdir / 'in-process.db'}",
        log_level="WARNING",
        whatsapp_app_secret=APP_SECRET,
        whatsapp_verify_token="bench",
        allow_open_reads=True,
    )
    longest = []
    with AppClient(create_app(settings)) as client:
        for round_ in range(rounds):
            body = big_batch(50 + round_)
            headers = {"x-hub-signature-256": hub_signature(body, APP_SECRET)}

            async def scenario(body: bytes = body, headers: dict[str, str] = headers) -> float:
                (status, _, _), work = await longest_loop_work(
                    client, "/webhook/whatsapp", headers, body
                )
                assert status == 200
                return work

            longest.append(run_in_app(client, scenario))
    return longest


def run_page_overhead(args: argparse.Namespace, workdir: Path, source: Path) -> list[str]:
    """GET /messages?limit=50 at 1 connection: this version beside `--compare-with`."""
    other = Variant("other", SERVICE.argv, log=True, queries=True)
    times: dict[str, list[float]] = {"this": [], "other": []}
    for index in range(args.passes):
        for name in ("this", "other") if index % 2 == 0 else ("other", "this"):
            run_dir = workdir / f"page-{name}-{index}"
            run_dir.mkdir()
            db = run_dir / "app.db"
            shutil.copy(source, db)
            cwd = None if name == "this" else Path(args.compare_with)
            with serve(SERVICE if name == "this" else other, run_dir, db, cwd=cwd) as server:
                offset = settled_log_size(server)
                result = run_dir / "page.json"
                finish_wrk(
                    start_wrk(
                        server.url + "/messages?limit=50", connections=1, duration=5, result=result
                    ),
                    result,
                )
                measured = server_time_ms(server.log, offset, "/messages")
                if measured is not None:
                    times[name].append(measured)
    this, other_ms = statistics.median(times["this"]), statistics.median(times["other"])
    return [
        f"GET /messages?limit=50 at {args.rows:,} rows, 1 connection, server time (median of"
        f" {args.passes} passes): this version {this * 1000:.0f} us,"
        f" {args.compare_with} {other_ms * 1000:.0f} us ({(this - other_ms) * 1000:+.0f} us)"
    ]


@contextlib.contextmanager
def more_open_files() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--duration", type=float, default=15, help="seconds of ingest per phase")
    parser.add_argument("--slow-seconds", type=float, default=20)
    parser.add_argument("--skip", default="", help="comma list: sqlite,postgres,slow,batch")
    parser.add_argument("--compare-with", default="", help="another checkout, for a normal page")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the servers of the search runs (repeatable)",
    )
    parser.add_argument(
        "--prefilled", default="", help="a SQLite store made by bench.dataset, instead of a new one"
    )
    args = parser.parse_args()
    skip = set(args.skip.split(","))
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    output = [
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start;"
        f" {args.passes} passes, medians"
    ]
    with tempfile.TemporaryDirectory(prefix="bench-costs-") as tmp, more_open_files():
        workdir = Path(tmp)
        source = Path(args.prefilled) if args.prefilled else None
        if source is None and ("sqlite" not in skip or args.compare_with):
            source = workdir / "prefill.db"
            started = time.monotonic()
            prefill_service(source, args.rows)
            print(f"  prefilled SQLite in {time.monotonic() - started:.0f} s", file=sys.stderr)
        if "sqlite" not in skip and source is not None:
            output += run_searches("SQLite", args, workdir, source, None)
        if "postgres" not in skip:
            reason = why_unavailable()
            if reason:
                output.append(f"PostgreSQL: skipped ({reason})")
            else:
                with running_cluster() as cluster:
                    url = cluster.create_database("costs")
                    started = time.monotonic()
                    prefill_postgres(url, args.rows)
                    print(
                        f"  prefilled PostgreSQL in {time.monotonic() - started:.0f} s",
                        file=sys.stderr,
                    )
                    output += run_searches("PostgreSQL", args, workdir, None, url)
        if "slow" not in skip:
            output += run_slow_bodies(args, workdir)
        if "batch" not in skip:
            output += run_big_batch(args, workdir)
        if args.compare_with and source is not None:
            output += run_page_overhead(args, workdir, source)
    print("\n".join(output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
