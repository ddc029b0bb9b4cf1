"""Failure drills for the PostgreSQL stack (docker-compose.postgres.yml), through HAProxy.

    python3 scripts/scale_drills.py --public http://127.0.0.1:8000 --operator http://127.0.0.1:8001

Against a running stack of three `api` replicas (`make up-postgres`), from the repository
folder, with the stack's WEBHOOK_SECRET and POSTGRES_PASSWORD in the environment (and
COMPOSE_PROJECT_NAME if the stack has one):

1. contract: the SPEC's answers through the public side, reads refused there and served
   on the operator side, over-limit bodies answered 413 (never a closed connection),
   a WhatsApp batch near 3 MB taken whole when WHATSAPP_APP_SECRET is set;
2. kill: signed deliveries on 64 connections, one replica killed with SIGKILL and brought
   back (`up -d --scale api=3`: Docker does not restart what `docker kill` stopped);
3. rolling restart: every replica restarted in turn (SIGTERM, drain, start) under load;
4. database restart: PostgreSQL stopped for 5 s under load, then started;
5. database frozen: PostgreSQL paused for 5 s under load (nothing answers, nothing is
   refused), then unpaused.

Then every acknowledged message_id is looked up in PostgreSQL, and the figures are printed
(and written as JSON with --json). Exit status 1 if any drill missed its bar.

Standard library only. Deliveries go to 127.0.0.1; the balancer's state is read from its
stats page on the lb container's own loopback, and each replica's readiness from inside
its container, with short helper processes that run for the drill and stop by themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
COMPOSE = ["docker", "compose", "-f", "docker-compose.yml", "-f", "docker-compose.postgres.yml"]
REPLICAS = 3
# The sender's bar for the database drill: an answer (503 or 200) within this many seconds.
ANSWER_DEADLINE = 5.0
# Longest a delivery is retried before the load generator gives it up (a drill failure).
GIVE_UP_AFTER = 60.0


class DrillFailed(Exception):
    """A step missed its bar or timed out; the message says which and by how much."""


def now() -> float:
    # Wall-clock time: the helpers inside the containers stamp their events with it too.
    return time.time()


# Docker and Compose, every call bounded.


def run(args: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(  # noqa: S603 - fixed docker commands, no shell
            args,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise DrillFailed(f"`{' '.join(args)}` did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise DrillFailed(f"`{' '.join(args)}` failed: {done.stderr.strip()[-400:]}")
    return done.stdout


def compose(*args: str, timeout: float = 60) -> str:
    return run([*COMPOSE, *args], timeout)


def replica_ids() -> list[str]:
    return compose("ps", "-q", "api").split()


def container_ip(container: str) -> str:
    template = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    return run(["docker", "inspect", "-f", template, container], 10).split()[0]


def psql(sql: str, timeout: float = 60) -> str:
    return compose(
        "exec", "-T", "postgres", "psql", "-U", "webhook", "-d", "webhook", "-At", "-c", sql,
        timeout=timeout,
    )  # fmt: skip


# Helpers that run inside containers: they print JSON lines (LB_WATCH one per change,
# READY_WATCH one per probe), and stop by themselves when their standard input closes
# (this script ended, or its docker client did) or after `seconds`, whichever is first.

STOP_ON_EOF = r"""
import os, sys, threading
def _stop_on_eof():
    sys.stdin.read()
    os._exit(0)
threading.Thread(target=_stop_on_eof, daemon=True).start()
"""

LB_WATCH = r"""
import csv, io, json, sys, time, urllib.request
end = time.time() + float(sys.argv[1])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
last = {}
while time.time() < end:
    try:
        with opener.open("http://127.0.0.1:8404/;csv;norefresh", timeout=1) as reply:
            text = reply.read().decode()
    except OSError as exc:
        print(json.dumps({"t": time.time(), "error": str(exc)}), flush=True)
        time.sleep(0.5)
        continue
    seen = time.time()
    for row in csv.DictReader(io.StringIO(text.lstrip("# "))):
        if row["pxname"] != "api" or row["svname"] in ("FRONTEND", "BACKEND"):
            continue
        state = {"status": row["status"], "addr": row["addr"].rsplit(":", 1)[0],
                 "check": row["check_status"].lstrip("* "), "code": row["check_code"]}
        if last.get(row["svname"]) != state:
            last[row["svname"]] = state
            print(json.dumps({"t": seen, "server": row["svname"], **state}), flush=True)
    time.sleep(0.1)
"""

READY_WATCH = r"""
import json, sys, time, urllib.error, urllib.request
end = time.time() + float(sys.argv[1])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
while time.time() < end:
    start = time.time()
    try:
        with opener.open("http://127.0.0.1:8000/health/ready", timeout=10) as reply:
            status = reply.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError:
        status = 0
    took = time.time() - start
    print(json.dumps({"t": start, "took": took, "status": status}), flush=True)
    time.sleep(0.1)
"""

READY_ONCE = r"""
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
sys.exit(0 if opener.open("http://127.0.0.1:8000/health/ready", timeout=2).status == 200 else 1)
"""
# A check that has no answer within this long has failed, for HAProxy (`timeout check`)
# as for the SPEC ("a database that does not answer within about a second").
CHECK_TIMEOUT = 1.0


class Watcher:
    """A helper's JSON lines, collected by a thread as they come.

    `args` runs a Python in a container (`docker run -i ...` or `docker exec -i ...`),
    `script` is its program and `seconds` its longest life.
    """

    def __init__(self, args: list[str], script: str, seconds: float) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        program = STOP_ON_EOF + script
        self.process = subprocess.Popen(  # noqa: S603 - fixed docker commands, no shell
            [*args, "-u", "-c", program, str(seconds)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                with self.lock:
                    self.events.append(event)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.events)

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


class Balancer:
    """HAProxy's view of the replicas, from its stats page (see LB_WATCH)."""

    def __init__(self, image: str, seconds: float) -> None:
        lb = compose("ps", "-q", "lb").strip()
        if not lb:
            raise DrillFailed("no lb container: is the PostgreSQL stack up?")
        # The api image has a Python; the haproxy image has no HTTP client at all.
        args = ["docker", "run", "--rm", "-i", "--network", f"container:{lb}"]
        args += ["--read-only", "--cap-drop", "ALL", "--entrypoint", "python", image]
        self.watcher = Watcher(args, LB_WATCH, seconds)
        wait_until(lambda: len(self.state()) > 0, 30, "the balancer's stats page to answer")

    def state(self) -> dict[str, dict[str, Any]]:
        current: dict[str, dict[str, Any]] = {}
        for event in self.watcher.snapshot():
            if "server" in event:
                current[event["server"]] = event
        return current

    def up_addresses(self) -> set[str]:
        """Replicas in rotation: UP, or UP with a failed check short of `fall` ("UP 1/2")."""
        return {s["addr"] for s in self.state().values() if s["status"].startswith("UP")}

    def first(self, addr: str, states: tuple[str, ...], since: float) -> float | None:
        """When the replica at `addr` was first seen in one of `states` (DOWN, MAINT, ...)."""
        for event in self.watcher.snapshot():
            if "server" not in event or event["addr"] != addr or event["t"] < since:
                continue
            if event["status"].split(" ")[0] in states:
                return float(event["t"])
        return None

    def stop(self) -> None:
        self.watcher.stop()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds it took for `condition` to hold, polled every 50 ms; DrillFailed past timeout."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise DrillFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


# The sender: signed deliveries on N keep-alive connections, each retried until it is
# acknowledged (200), as a webhook sender does.


@dataclass
class PhaseFigures:
    seconds: float = 0.0
    attempts: int = 0
    deliveries: int = 0
    acked: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    # Attempts that got no 200: no answer or 502/503/504 (both retried), or anything else.
    failed_attempts: int = 0
    retried_then_acked: int = 0
    unexpected: Counter[str] = field(default_factory=Counter)
    no_retry_after: int = 0
    max_latency: float = 0.0
    over_deadline: int = 0
    given_up: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 1),
            "requests_per_s": round(self.attempts / self.seconds) if self.seconds else 0,
            "attempts": self.attempts,
            "deliveries": self.deliveries,
            "acked": self.acked,
            "failed_attempts": self.failed_attempts,
            "failed_pct": round(100 * self.failed_attempts / max(self.attempts, 1), 3),
            "retried_then_acked": self.retried_then_acked,
            "statuses": dict(self.statuses),
            "unexpected": dict(self.unexpected),
            "503_without_retry_after": self.no_retry_after,
            "max_latency_s": round(self.max_latency, 3),
            "over_5s": self.over_deadline,
            "given_up": self.given_up,
        }


class Sender:
    """Runs on its own thread and event loop; the drills set `phase` as they go."""

    def __init__(self, url: str, secret: bytes, connections: int, run_id: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.secret = secret
        self.connections = connections
        self.run_id = run_id
        self.phase = "idle"
        self.phases: dict[str, PhaseFigures] = {}
        self.acked: set[str] = set()
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def figures(self, phase: str) -> PhaseFigures:
        return self.phases.setdefault(phase, PhaseFigures())

    def start(self, phase: str) -> None:
        self.phase = phase
        self._started = time.monotonic()
        ready = threading.Event()

        def main() -> None:
            async def go() -> None:
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                ready.set()
                await asyncio.gather(*(self._worker(n) for n in range(self.connections)))

            asyncio.run(go())

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise DrillFailed("the load generator did not start")

    def stop(self) -> None:
        """Stop taking new deliveries; those under way finish (acknowledged or given up)."""
        assert self._loop is not None
        assert self._stop is not None
        assert self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(GIVE_UP_AFTER + 30)
        if self._thread.is_alive():
            raise DrillFailed("the load generator did not stop")
        self.figures(self.phase).seconds += time.monotonic() - self._started

    def _message(self) -> tuple[str, bytes]:
        self._next += 1
        message_id = f"drill-{self.run_id}-{self._next}"
        body = json.dumps(
            {
                "message_id": message_id,
                "from": f"+9198{self._next % 100_000:07d}",
                "to": "+14155550100",
                "ts": "2025-01-15T10:00:00Z",
                "text": "drill",
            },
            separators=(",", ":"),
        ).encode()
        return message_id, body

    async def _worker(self, number: int) -> None:
        assert self._stop is not None
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while not self._stop.is_set():
            message_id, body = self._message()
            phase = self.phase
            figures = self.figures(phase)
            figures.deliveries += 1
            signature = hmac.new(self.secret, body, hashlib.sha256).hexdigest()
            request = (
                # The host as the sender names it: the service checks it (ALLOWED_HOSTS).
                f"POST /webhook HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Content-Type: application/json\r\n"
                f"X-Signature: {signature}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            first_try = True
            deadline = time.monotonic() + GIVE_UP_AFTER
            while True:
                figures = self.figures(self.phase)
                figures.attempts += 1
                started = time.monotonic()
                status, retry_after, conn = await self._attempt(conn, request)
                latency = time.monotonic() - started
                figures.max_latency = max(figures.max_latency, latency)
                if latency > ANSWER_DEADLINE:
                    figures.over_deadline += 1
                figures.statuses[str(status)] += 1
                if status == 200:
                    self.acked.add(message_id)
                    self.figures(phase).acked += 1
                    if not first_try:
                        figures.retried_then_acked += 1
                    break
                figures.failed_attempts += 1
                first_try = False
                if status not in ("no answer", 502, 503, 504):
                    figures.unexpected[str(status)] += 1
                    break
                if status == 503 and retry_after is None:
                    figures.no_retry_after += 1
                if time.monotonic() > deadline:
                    figures.given_up += 1
                    break
                # Retry-After is honoured (capped), as a well-behaved sender would.
                await asyncio.sleep(min(retry_after or 0.05, 1.0))

    async def _attempt(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None, request: bytes
    ) -> tuple[int | str, float | None, tuple[asyncio.StreamReader, asyncio.StreamWriter] | None]:
        try:
            async with asyncio.timeout(10):
                if conn is None:
                    conn = await asyncio.open_connection(self.host, self.port)
                reader, writer = conn
                writer.write(request)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
        except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            if conn is not None:
                conn[1].close()
            return "no answer", None, None
        if headers.get("connection", "").lower() == "close":
            writer.close()
            conn = None
        retry_after = headers.get("retry-after")
        return status, float(retry_after) if retry_after else None, conn


# The contract through the balancer.


# The first of the service's read tokens, when the stack has them: the operator side
# passes the Authorization header through to the service (docs/security.md).
READ_TOKEN = os.environ.get("READ_TOKENS", "").split(",")[0]


def request(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    *,
    token: bool = True,
) -> tuple[int | str, bytes, dict[str, str]]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    sent = dict(headers or {})
    if READ_TOKEN and token:
        sent.setdefault("Authorization", f"Bearer {READ_TOKEN}")
    try:
        conn.request(method, path, body=body, headers=sent)
        reply = conn.getresponse()
        return reply.status, reply.read(), {k.lower(): v for k, v in reply.getheaders()}
    except (OSError, http.client.HTTPException) as exc:
        return f"no answer ({type(exc).__name__})", b"", {}
    finally:
        conn.close()


def signed(secret: bytes, body: bytes) -> dict[str, str]:
    signature = hmac.new(secret, body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Signature": signature}


def contract(public: str, operator: str, secret: bytes, run_id: str) -> dict[str, Any]:
    checks: list[tuple[str, object, object]] = []

    def expect(label: str, got: object, wanted: object) -> None:
        checks.append((label, got, wanted))

    def message(suffix: str, ts: str = "2025-01-15T10:00:00Z") -> bytes:
        fields = {"message_id": f"contract-{run_id}-{suffix}", "from": "+919876543210"}
        fields |= {"to": "+14155550100", "ts": ts, "text": "Hello"}
        return json.dumps(fields).encode()

    body = message("1")
    expect("public GET /health/live", request(public, "GET", "/health/live")[0], 200)
    expect("public GET /health/ready", request(public, "GET", "/health/ready")[0], 200)
    expect(
        "POST /webhook new", request(public, "POST", "/webhook", body, signed(secret, body))[0], 200
    )
    expect(
        "POST /webhook again",
        request(public, "POST", "/webhook", body, signed(secret, body))[0],
        200,
    )
    forged = signed(secret + b"-wrong", body)
    status, reply, _ = request(public, "POST", "/webhook", body, forged)
    expect("POST /webhook forged", (status, reply), (401, b'{"detail":"invalid signature"}'))
    bad = message("2", ts="2025-02-30T10:00:00Z")
    expect(
        "POST /webhook invalid ts",
        request(public, "POST", "/webhook", bad, signed(secret, bad))[0],
        422,
    )
    plain = signed(secret, body) | {"Content-Type": "text/plain"}
    expect("POST /webhook text/plain", request(public, "POST", "/webhook", body, plain)[0], 415)
    for path in ("/messages", "/stats", "/metrics", "/docs", "/openapi.json", "/"):
        expect(f"public GET {path} (not exposed)", request(public, "GET", path)[0], 404)
    status, reply, _ = request(operator, "GET", "/messages?q=Hello&from=%2B919876543210&limit=100")
    found = status == 200 and f"contract-{run_id}-1" in reply.decode()
    expect("operator GET /messages finds it", (status, found), (200, True))
    status, reply, _ = request(operator, "GET", "/stats")
    expect("operator GET /stats", (status, b"total_messages" in reply), (200, True))
    status, reply, _ = request(operator, "GET", "/metrics")
    expect("operator GET /metrics", (status, b"webhook_requests_total" in reply), (200, True))
    expect("operator GET /docs", request(operator, "GET", "/docs")[0], 200)
    if READ_TOKEN:
        unread = request(operator, "GET", "/messages", token=False)[0]
        expect("operator GET /messages without the read token", unread, 401)
    # Bodies over the limit, each on a new connection: the 413 must arrive every time
    # (answered before the body was read, it used to reach some senders as a reset).
    outcomes: Counter[str] = Counter()
    big = b"{" + b" " * 70_000 + b"}"
    for _ in range(200):
        outcomes[str(request(public, "POST", "/webhook", big, signed(secret, big))[0])] += 1
    expect("200 x POST /webhook of 70 KB", dict(outcomes), {"413": 200})
    edge = b"{" + b" " * (65536 - 2) + b"}"
    status = request(public, "POST", "/webhook", edge, signed(secret, edge))[0]
    expect("POST /webhook of exactly 64 KiB (reaches the service)", status, 422)

    whatsapp = os.environ.get("WHATSAPP_APP_SECRET", "").encode()
    token = os.environ.get("WHATSAPP_VERIFY_TOKEN", "")
    if whatsapp and token:
        query = urllib.parse.urlencode(
            {"hub.mode": "subscribe", "hub.verify_token": token, "hub.challenge": "1158201444"}
        )
        status, reply, _ = request(public, "GET", f"/webhook/whatsapp?{query}")
        expect("GET /webhook/whatsapp handshake", (status, reply), (200, b"1158201444"))
        batch = whatsapp_batch(run_id, 2_900_000)
        headers = {
            "Content-Type": "application/json",
            "X-Hub-Signature-256": "sha256="
            + hmac.new(whatsapp, batch, hashlib.sha256).hexdigest(),
        }
        status = request(public, "POST", "/webhook/whatsapp", batch, headers)[0]
        expect(f"POST /webhook/whatsapp of {len(batch) / 1e6:.2f} MB", status, 200)
        over = batch + b" " * (3 * 1024 * 1024 + 1 - len(batch))
        status = request(public, "POST", "/webhook/whatsapp", over, headers)[0]
        expect("POST /webhook/whatsapp of 3 MiB + 1 byte", status, 413)

    failed = [(label, got, wanted) for label, got, wanted in checks if got != wanted]
    for label, got, wanted in checks:
        mark = "ok" if got == wanted else f"FAILED: got {got!r}, wanted {wanted!r}"
        print(f"  {label:<56} {mark}")
    if failed:
        raise DrillFailed(f"{len(failed)} contract checks failed")
    return {"checks": len(checks), "over_limit_413": outcomes["413"]}


def whatsapp_batch(run_id: str, size: int) -> bytes:
    """One entry of text messages of 4,000 characters each, as Meta sends, near `size`."""

    def message(number: int) -> dict[str, Any]:
        return {
            "from": "16315551234",
            "id": f"wamid.drill-{run_id}-{number:06d}",
            "timestamp": "1603059201",
            "type": "text",
            "text": {"body": "x" * 4000},
        }

    each = len(json.dumps(message(0))) + 2
    messages = [message(number) for number in range((size - 1000) // each)]
    value = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": "106540352242922"},
        "messages": messages,
    }
    entry = {"id": "102290129340398", "changes": [{"field": "messages", "value": value}]}
    return json.dumps({"object": "whatsapp_business_account", "entry": [entry]}).encode()


@contextlib.contextmanager
def load(sender: Sender, phase: str, warm: float) -> Iterator[None]:
    sender.start(phase)
    time.sleep(warm)
    try:
        yield
    finally:
        sender.stop()


def kill_drill(sender: Sender, lb: Balancer) -> dict[str, Any]:
    victim = replica_ids()[0]
    addr = container_ip(victim)
    out = ("DOWN", "MAINT")
    with load(sender, "kill", warm=4):
        killed_at = now()
        run(["docker", "kill", victim], 20)
        taken_out = lambda: lb.first(addr, out, killed_at) is not None  # noqa: E731
        wait_until(taken_out, 15, "the balancer to take the killed replica out")
        out_after = (lb.first(addr, out, killed_at) or killed_at) - killed_at
        time.sleep(4)
        # Docker leaves a killed container stopped (a stop by hand): bring it back.
        up_at = now()
        compose("up", "-d", "--no-build", "--scale", f"api={REPLICAS}", timeout=120)
        wait_until(lambda: len(lb.up_addresses()) == REPLICAS, 60, f"{REPLICAS} replicas UP")
        back_after = now() - up_at
        time.sleep(3)
    return {"out_of_rotation_s": round(out_after, 2), "back_in_rotation_s": round(back_after, 2)}


def ready_inside(container: str) -> bool:
    command = ["docker", "exec", container, "python", "-c", READY_ONCE]
    try:
        run(command, 10)
    except DrillFailed:
        return False
    return True


def rolling_drill(sender: Sender, lb: Balancer) -> dict[str, Any]:
    rounds = []
    with load(sender, "rolling", warm=3):
        for container in replica_ids():
            started = now()
            run(["docker", "restart", "-t", "30", container], 60)
            addr = container_ip(container)

            # Ready by its own account, and UP for HAProxy. (A quick restart can fall
            # between two checks, so HAProxy's UP alone may be the one from before.)
            def back(container: str = container, addr: str = addr) -> bool:
                up = lb.up_addresses()
                return addr in up and len(up) == REPLICAS and ready_inside(container)

            wait_until(back, 60, "the restarted replica back in rotation")
            rounds.append(round(now() - started, 2))
        time.sleep(2)
    return {"restart_to_back_in_rotation_s": rounds}


# How PostgreSQL goes away for 5 s: stopped and started again (its name leaves Docker's
# DNS, connections are refused or reset at once), or frozen (SIGSTOP through the cgroup
# freezer: connections stay open and nothing answers, as in a network partition or a
# stalled disk; every call then runs into WRITE_TIMEOUT_SECONDS).
OUTAGES = {"database": ("stop", "start"), "frozen": ("pause", "unpause")}


def database_drill(sender: Sender, lb: Balancer, phase: str = "database") -> dict[str, Any]:
    away, back = OUTAGES[phase]
    replicas = {container: container_ip(container) for container in replica_ids()}
    watchers = {
        container: Watcher(["docker", "exec", "-i", container, "python"], READY_WATCH, 90)
        for container in replicas
    }
    try:
        with load(sender, phase, warm=3):
            stopped_at = now()
            compose(away, "postgres", timeout=60)
            stop_took = now() - stopped_at
            time.sleep(5)
            compose(back, "postgres", timeout=60)
            start_returned = now()

            def accepting() -> bool:
                with contextlib.suppress(DrillFailed):
                    compose("exec", "-T", "postgres", "pg_isready", "-U", "webhook", timeout=5)
                    return True
                return False

            wait_until(accepting, 30, "PostgreSQL to accept connections again")
            accepting_at = now()

            def all_ready() -> bool:
                ready = all(
                    (w.snapshot() or [{}])[-1].get("status") == 200 for w in watchers.values()
                )
                return ready and lb.up_addresses() >= set(replicas.values())

            wait_until(all_ready, 30, "every replica ready and in rotation")
            healthy_at = now()
            time.sleep(3)
    finally:
        for watcher in watchers.values():
            watcher.stop()

    # Per replica: when its own /health/ready first failed, as seen from inside its
    # container (the probe's answer, or CHECK_TIMEOUT after it was asked if the answer
    # took longer), and when HAProxy took it out of rotation.
    out_delays, outage_statuses, slowest = [], [], 0.0
    for container, addr in replicas.items():
        probes = [e for e in watchers[container].snapshot() if e["t"] >= stopped_at]
        failed = [e for e in probes if e["status"] != 200 or e["took"] > CHECK_TIMEOUT]
        outage_statuses.append(sorted({e["status"] for e in failed}))
        slowest = max([slowest, *(e["took"] for e in failed)])
        if failed:
            failed_at = failed[0]["t"] + min(failed[0]["took"], CHECK_TIMEOUT)
            down = lb.first(addr, ("DOWN", "MAINT"), stopped_at)
            if down is not None:
                out_delays.append(round(max(down - failed_at, 0.0), 2))
    return {
        "database_stop_took_s": round(stop_took, 2),
        "readiness_during_outage": outage_statuses,
        "slowest_readiness_answer_s": round(slowest, 2),
        "out_of_rotation_after_ready_failed_s": out_delays,
        # From `docker compose start|unpause postgres` returning (a started server then
        # needs a moment to accept connections: the longer of the two), and from
        # pg_isready first answering.
        "all_healthy_after_start_s": round(healthy_at - start_returned, 2),
        "all_healthy_after_accepting_s": round(healthy_at - accepting_at, 2),
    }


def frozen_drill(sender: Sender, lb: Balancer) -> dict[str, Any]:
    return database_drill(sender, lb, "frozen")


PHASES = ("kill", "rolling", "database", "frozen")


def check(figures: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """Every bar of the issue, as a list of what was missed."""
    missed = []
    for phase in PHASES:
        phase_figures = figures[phase]
        if phase_figures["unexpected"]:
            missed.append(f"{phase}: unexpected answers {phase_figures['unexpected']}")
        if phase_figures["given_up"]:
            missed.append(f"{phase}: {phase_figures['given_up']} deliveries never acknowledged")
        if phase_figures["503_without_retry_after"]:
            missed.append(f"{phase}: 503 without Retry-After")
    if figures["kill"]["failed_pct"] >= 1.0:
        missed.append(f"kill: {figures['kill']['failed_pct']}% failed requests (bar: < 1%)")
    if figures["rolling"]["failed_attempts"]:
        missed.append(f"rolling: {figures['rolling']['failed_attempts']} answers other than 200")
    for phase in OUTAGES:
        if figures[phase]["over_5s"]:
            missed.append(f"{phase}: {figures[phase]['over_5s']} answers took over 5 s")
        outage = results[phase]
        if outage["readiness_during_outage"] != [[503]] * REPLICAS:
            readiness = outage["readiness_during_outage"]
            missed.append(f"{phase}: readiness {readiness} (bar: 503 on each replica)")
        if outage["all_healthy_after_start_s"] > 10:
            missed.append(f"{phase}: not every replica healthy within 10 s of the database")
        delays = outage["out_of_rotation_after_ready_failed_s"]
        if len(delays) != REPLICAS or max(delays) > 2:
            missed.append(f"{phase}: out of rotation after readiness failed: {delays} (bar: 2 s)")
    if results["stored"]["lost"]:
        missed.append(f"{results['stored']['lost']} acknowledged messages not stored")
    return missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--public", default="http://127.0.0.1:8000")
    parser.add_argument("--operator", default="http://127.0.0.1:8001")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    for url in (args.public, args.operator):
        if urllib.parse.urlsplit(url).hostname not in ("127.0.0.1", "localhost"):
            parser.error("the drills only talk to the loopback address (127.0.0.1)")
    secret = os.environ.get("WEBHOOK_SECRET", "").encode()
    if not secret:
        parser.error("WEBHOOK_SECRET must be set (the stack's)")

    run_id = secrets.token_hex(4)
    started = time.monotonic()
    if len(replica_ids()) != REPLICAS:
        raise DrillFailed(f"the drills want {REPLICAS} api replicas (make up-postgres)")
    image = run(["docker", "inspect", "-f", "{{.Config.Image}}", replica_ids()[0]], 10).strip()
    lb = Balancer(image, seconds=600)
    results: dict[str, Any] = {"run": run_id}
    try:
        wait_until(lambda: len(lb.up_addresses()) == REPLICAS, 60, f"{REPLICAS} replicas UP")
        print("contract, through the balancer:")
        results["contract"] = contract(args.public, args.operator, secret, run_id)
        sender = Sender(args.public, secret, args.connections, run_id)
        drills: dict[str, Callable[[Sender, Balancer], dict[str, Any]]] = {
            "kill": kill_drill,
            "rolling": rolling_drill,
            "database": database_drill,
            "frozen": frozen_drill,
        }
        for name, drill in drills.items():
            print(f"drill: {name} ...", flush=True)
            results[name] = drill(sender, lb)
            print(f"  {json.dumps(sender.figures(name).as_dict())}")
            print(f"  {json.dumps(results[name])}", flush=True)
    finally:
        lb.stop()

    stored_rows = psql(f"SELECT message_id FROM messages WHERE message_id LIKE 'drill-{run_id}-%'")
    stored = set(stored_rows.split())
    lost = sender.acked - stored
    results["stored"] = {"acked": len(sender.acked), "stored": len(stored), "lost": len(lost)}
    figures = {phase: sender.figures(phase).as_dict() for phase in PHASES}
    results["figures"] = figures
    results["seconds"] = round(time.monotonic() - started, 1)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    missed = check(figures, results)
    for line in missed:
        print(f"MISSED: {line}")
    return 1 if missed else 0


def report(results: dict[str, Any]) -> None:
    figures = results["figures"]
    print()
    print(
        f"{'drill':<10} {'seconds':>7} {'requests':>9} {'per s':>6} {'failed':>7}"
        f" {'failed %':>9} {'acked':>8} {'longest s':>9}"
    )
    for phase in PHASES:
        f = figures[phase]
        print(
            f"{phase:<10} {f['seconds']:>7} {f['attempts']:>9} {f['requests_per_s']:>6}"
            f" {f['failed_attempts']:>7} {f['failed_pct']:>9} {f['acked']:>8}"
            f" {f['max_latency_s']:>9}"
        )
    stored = results["stored"]
    print(f"acknowledged {stored['acked']}, stored {stored['stored']}, lost {stored['lost']}")
    kill, rolling = results["kill"], results["rolling"]
    print(
        f"kill: out of rotation {kill['out_of_rotation_s']} s after SIGKILL, back "
        f"{kill['back_in_rotation_s']} s after `up -d --scale api={REPLICAS}`"
    )
    rounds = rolling["restart_to_back_in_rotation_s"]
    print(f"rolling restart: each replica back in rotation after {rounds} s")
    for phase, how in (("database", "restarted"), ("frozen", "unfrozen")):
        outage = results[phase]
        print(
            f"{phase}: 503s {figures[phase]['statuses'].get('503', 0)}, out of rotation "
            f"{outage['out_of_rotation_after_ready_failed_s']} s after readiness failed"
            f" (its slowest answer {outage['slowest_readiness_answer_s']} s), all healthy"
            f" {outage['all_healthy_after_start_s']} s after it was {how}"
        )
    print(f"drills took {results['seconds']} s")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DrillFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
