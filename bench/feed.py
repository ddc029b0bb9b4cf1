"""`make bench-feed` (and the feed section of `make bench`): the feed under load.

- Fan-out: SUBSCRIBERS Server-Sent Events streams open while messages are posted at a
  fixed RATE for DURATION seconds, beside the same ingest with no subscriber. Every
  tenth message carries a probe mark; each subscriber notes when each mark arrives, and
  the latency is that moment minus the moment the POST's `200` came back. Ingest is
  reported as the rate achieved and the POST latency, with and without subscribers; the
  server's resident memory (peak) with them.
- Catch-up: a poller reads a store of MILLION messages from position 0 with limit=1000,
  parsing every page as a consumer would: messages per second.

The subscribers run in their own processes (asyncio, raw sockets; they only search each
chunk for the probe marks), the posting client in this one. Everything shares the
machine's cores with the server, as in the other benches.

    python -m bench.feed [--subscribers 1000] [--rate 1000] [--duration 10] [--rows 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import hmac
import http.client
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from bench.dataset import prefill_service
from bench.run import SECRET, VARIANTS, Server, serve

PROBE = b"PROBE"
SUBSCRIBER_PROCESSES = 2


def percentile(values: Sequence[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def body(index: int, run: str) -> bytes:
    text = f"{PROBE.decode()}{index}. hello from the feed bench" if index % 10 == 0 else "hi"
    fields = {
        "message_id": f"feed-{run}-{index}",
        "from": f"+1555{index % 1000:07d}",
        "to": "+14155550100",
        "ts": "2025-02-01T10:00:00Z",
        "text": text,
    }
    return json.dumps(fields, separators=(",", ":")).encode()


def request(raw: bytes) -> bytes:
    signature = hmac.digest(SECRET.encode(), raw, "sha256").hex()
    return (
        b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"X-Signature: %s\r\nContent-Length: %d\r\n\r\n%s" % (signature.encode(), len(raw), raw)
    )


async def post_at_rate(
    port: int, rate: float, duration: float, run: str, connections: int = 32
) -> tuple[float, list[float], dict[int, float]]:
    """(messages/s achieved, POST latencies in ms, {probe index: monotonic time of its 200})."""
    total = int(rate * duration)
    queue: asyncio.Queue[int] = asyncio.Queue()
    latencies: list[float] = []
    acked: dict[int, float] = {}
    start = time.monotonic()

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                index = await queue.get()
                if index < 0:
                    return
                sent = time.monotonic()
                writer.write(request(body(index, run)))
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                done = time.monotonic()
                if not head.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"POST answered {head[:20]!r}")
                latencies.append((done - sent) * 1000)
                if index % 10 == 0:
                    acked[index] = done
        finally:
            writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    for index in range(total):
        # Open loop: each message is due at its own time, whatever the answers do.
        delay = start + index / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait(index)
    for _ in workers:
        queue.put_nowait(-1)
    await asyncio.gather(*workers)
    return total / (time.monotonic() - start), latencies, acked


class ProbeReader(asyncio.Protocol):
    """One subscriber: notes when each probe mark arrives, and nothing else."""

    def __init__(self, seen: list[tuple[int, float]]) -> None:
        self.seen = seen
        self.tail = b""
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        chunk = self.tail + data
        at = chunk.find(PROBE)
        while at >= 0:
            end = chunk.find(b".", at)
            if end < 0:
                break
            self.seen.append((int(chunk[at + len(PROBE) : end]), now))
            at = chunk.find(PROBE, end)
        self.tail = chunk[at:] if at >= 0 else chunk[-16:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def subscribe(port: int, count: int, after: int, stop: Connection, out: Connection) -> None:
    """A subscriber process: `count` streams until told to stop; sends back what it saw."""

    async def main() -> list[list[tuple[int, float]]]:
        loop = asyncio.get_running_loop()
        seen: list[list[tuple[int, float]]] = []
        readers = []
        for _ in range(count):
            mine: list[tuple[int, float]] = []
            seen.append(mine)
            transport, reader = await loop.create_connection(
                functools.partial(ProbeReader, mine), "127.0.0.1", port
            )
            transport.write(
                b"GET /feed/stream?after=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % after
            )
            readers.append((transport, reader))
        out.send(("ready", None))
        await loop.run_in_executor(None, stop.recv)
        dropped = sum(reader.closed.done() for _, reader in readers)
        for transport, _ in readers:
            transport.close()
        out.send(("dropped", dropped))
        return seen

    started = time.process_time()
    seen = asyncio.run(main())
    out.send(("cpu", time.process_time() - started))
    out.send(("seen", seen))


def last_position(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    after = 0
    while True:
        conn.request("GET", f"/feed?after={after}&limit=1000")
        page = json.loads(conn.getresponse().read())
        if not page["data"]:
            conn.close()
            return after
        after = page["next_after"]


def ingest(server: Server, args: argparse.Namespace, run: str) -> dict[str, float]:
    cpu = server.cpu_seconds()
    rate, latencies, _ = asyncio.run(post_at_rate(server.port, args.rate, args.feed_duration, run))
    return {
        "rate": rate,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "cpu_us": (server.cpu_seconds() - cpu) / len(latencies) * 1e6,
    }


def fanout(server: Server, args: argparse.Namespace, run: str) -> dict[str, float]:
    after = last_position(server.port)
    per_process = args.subscribers // SUBSCRIBER_PROCESSES
    context = multiprocessing.get_context("spawn")
    children = []
    for _ in range(SUBSCRIBER_PROCESSES):
        stop_recv, stop_send = context.Pipe(duplex=False)
        out_recv, out_send = context.Pipe(duplex=False)
        process = context.Process(
            target=subscribe, args=(server.port, per_process, after, stop_recv, out_send)
        )
        process.start()
        children.append((process, stop_send, out_recv))
    for _, _, out in children:
        assert out.recv()[0] == "ready"
    time.sleep(1)  # every stream has joined the tail
    rss_before = server.rss_mb()[0]
    cpu = server.cpu_seconds()
    rate, latencies, acked = asyncio.run(
        post_at_rate(server.port, args.rate, args.feed_duration, run)
    )
    time.sleep(1)  # the last events arrive
    cpu_us = (server.cpu_seconds() - cpu) / len(latencies) * 1e6
    rss_now, rss_peak = server.rss_mb()
    dropped, seen, client_cpu = 0, [], 0.0
    for process, stop, out in children:
        stop.send("stop")
        dropped += out.recv()[1]
        client_cpu += out.recv()[1]
        seen += out.recv()[1]
        process.join()
    delays = [(at - acked[index]) * 1000 for mine in seen for index, at in mine if index in acked]
    complete = sum(len(mine) == len(acked) for mine in seen)
    return {
        "rate": rate,
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "cpu_us": cpu_us,
        # The subscribers' own CPU, over the whole run (connecting included): they share
        # the machine's cores with the server.
        "client_cpu_us": client_cpu / len(latencies) * 1e6,
        "event_p50": percentile(delays, 0.5),
        "event_p99": percentile(delays, 0.99),
        "event_max": max(delays),
        "complete": complete,
        "streams": len(seen),
        "dropped": dropped,
        "rss_before": rss_before,
        "rss": rss_now,
        "rss_peak": rss_peak,
    }


def catch_up(server: Server) -> tuple[int, float]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    after, count = 0, 0
    started = time.monotonic()
    while True:
        conn.request("GET", f"/feed?after={after}&limit=1000")
        page = json.loads(conn.getresponse().read())
        if not page["data"]:
            break
        count += len(page["data"])
        after = page["next_after"]
    elapsed = time.monotonic() - started
    conn.close()
    return count, count / elapsed


# Each open stream holds one of the server's connections for as long as it is open: the
# 1,000 subscribers and the posters need more than the default HTTP_MAX_CONNECTIONS.
SERVICE = dataclasses.replace(VARIANTS["service"], env={"HTTP_MAX_CONNECTIONS": "4000"})


def run_feed(args: argparse.Namespace, workdir: Path) -> list[str]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    plain, loaded, catch = [], [], []
    for pass_index in range(args.passes):
        for kind in ("plain", "subscribers") if pass_index % 2 == 0 else ("subscribers", "plain"):
            run_dir = workdir / f"feed-{pass_index}-{kind}"
            run_dir.mkdir()
            with serve(SERVICE, run_dir, run_dir / "app.db") as server:
                run = f"{pass_index}{kind[0]}"
                if kind == "plain":
                    plain.append(ingest(server, args, run))
                else:
                    loaded.append(fanout(server, args, run))
        print(f"  pass {pass_index + 1}: feed fan-out done", file=sys.stderr)
    if args.feed_rows:
        source = workdir / "feed-rows.db"
        prefill_service(source, args.feed_rows)
        for pass_index in range(args.passes):
            run_dir = workdir / f"feed-catch-{pass_index}"
            run_dir.mkdir()
            db = run_dir / "app.db"
            db.write_bytes(source.read_bytes())
            with serve(VARIANTS["service"], run_dir, db) as server:
                catch.append(catch_up(server))
        print("  feed catch-up done", file=sys.stderr)
    return report(args, plain, loaded, catch)


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def report(
    args: argparse.Namespace,
    plain: list[dict[str, float]],
    loaded: list[dict[str, float]],
    catch: list[tuple[int, float]],
) -> list[str]:
    lines = [
        f"feed: {args.subscribers} SSE subscribers, POSTs at {args.rate:g}/s for"
        f" {args.feed_duration:g} s; {args.passes} passes, medians",
        f"{'':<34}{'msg/s':>9}{'POST p50':>10}{'POST p99':>10}{'server CPU/msg':>16}",
    ]
    for label, runs in (("ingest, no subscriber", plain), ("ingest, with subscribers", loaded)):
        lines.append(
            f"{label:<34}{median(runs, 'rate'):>9,.0f}{median(runs, 'p50'):>9.1f}ms"
            f"{median(runs, 'p99'):>9.1f}ms{median(runs, 'cpu_us'):>13,.0f} us"
        )
    ratio = median(loaded, "rate") / median(plain, "rate")
    lines += [
        f"ingest with subscribers / without: {ratio:.0%} (target: within 15%)",
        f"POST 200 -> event at a subscriber: p50 {median(loaded, 'event_p50'):.1f} ms,"
        f" p99 {median(loaded, 'event_p99'):.1f} ms (target < 100 ms),"
        f" max {median(loaded, 'event_max'):.0f} ms",
        f"the subscriber processes' own CPU: {median(loaded, 'client_cpu_us'):,.0f} us per"
        " message, on the same cores",
        f"streams that saw every probe: {median(loaded, 'complete'):.0f} of"
        f" {median(loaded, 'streams'):.0f}; dropped as too slow: {median(loaded, 'dropped'):.0f}",
        f"server RSS with subscribers: {median(loaded, 'rss'):.0f} MB (peak"
        f" {median(loaded, 'rss_peak'):.0f} MB, {median(loaded, 'rss_before'):.0f} MB before"
        " the messages; target < 300 MB)",
    ]
    if catch:
        count = catch[0][0]
        rate = statistics.median(rate for _, rate in catch)
        lines.append(
            f"catch-up: a poller read {count:,} messages with limit=1000 at {rate:,.0f}"
            " messages/s (target >= 50,000)"
        )
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=1000, help="POSTs per second")
    parser.add_argument("--feed-duration", dest="feed_duration", type=float, default=10)
    parser.add_argument("--feed-rows", dest="feed_rows", type=int, default=1_000_000)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passes", type=int, default=3)
    add_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-feed-") as tmp:
        lines = run_feed(args, Path(tmp))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
