"""Hostile HTTP against the real server (`python -m app serve`): malformed JSON, odd bytes,
oversized heads, smuggling attempts, wrong methods, oversized chunked bodies.

For every input: never a 5xx, never the input echoed back, and the server still answers.
"""

from __future__ import annotations

import json
import sqlite3
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.signature import sign
from tests.support.battery import (
    Connection,
    metrics_disagreements,
    raw_exchange,
    scrape,
    status_of,
)
from tests.support.clients import SECRET, message
from tests.support.servers import SERVE, Server, running_server
from tests.support.tiers import record

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

# Every hostile input carries this; no response may contain it.
MARKER = "zq7marker"


def signed_post(body: bytes, extra: str = "", content_type: str = "application/json") -> bytes:
    return (
        f"POST /webhook HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n"
        f"X-Signature: {sign(body, SECRET.encode())}\r\nContent-Length: {len(body)}\r\n"
        f"{extra}\r\n"
    ).encode() + body


def valid_body(**fields: object) -> bytes:
    # The id is logged by design (SPEC 7); the text must never be.
    return json.dumps(message(**{"message_id": "hostile", "text": MARKER, **fields})).encode()


def chunked(body: bytes, size: int = 4096) -> bytes:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def get(path: str, extra: str = "") -> bytes:
    """A GET; `extra` is more header lines, joined by CRLF."""
    head = f"GET {path} HTTP/1.1\r\nHost: localhost\r\n"
    return (head + (extra + "\r\n" if extra else "") + "\r\n").encode("latin-1")


def raw(head: str, body: bytes = b"") -> bytes:
    """A request from a head written with bare newlines: 'POST /webhook\nName: value'."""
    request_line, _, headers = head.partition("\n")
    lines = [f"{request_line} HTTP/1.1", "Host: localhost", *headers.splitlines()]
    if body and "content-length" not in head.lower():
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join([*lines, "", ""]).encode("latin-1") + body


def chunked_post(body: bytes, extra: str = "") -> bytes:
    head = f"POST /webhook HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n{extra}\r\n"
    return head.encode() + chunked(body)


@dataclass(frozen=True)
class Case:
    name: str
    request: bytes
    # What the service may answer; None in the set: it may also just close the connection.
    expected: frozenset[int | None]


def case(name: str, request: bytes, *expected: int | None) -> Case:
    return Case(name, request, frozenset(expected))


VALID = valid_body()
DEEP = b'{"message_id": ' + b"[" * 30000 + b"]" * 30000 + b"}"
TOO_BIG = (431, 400, None)
HEADERS = [f"X-H{i}: {MARKER}" for i in range(10000)]

CASES = [
    # JSON that is not quite JSON (signed, so it reaches the parser).
    case("truncated json", signed_post(VALID[:-7]), 422),
    case("trailing garbage", signed_post(VALID + b" " + MARKER.encode()), 422),
    case("two objects", signed_post(VALID + VALID), 422),
    case("deep nesting", signed_post(DEEP), 422),
    case("deep objects", signed_post(b'{"a":' * 10000 + b"1" + b"}" * 10000), 422),
    case("bom", signed_post(b"\xef\xbb\xbf" + VALID), 422),
    case("utf-16", signed_post(VALID.decode().encode("utf-16")), 422),
    case("invalid utf-8", signed_post(VALID.replace(MARKER.encode(), b"\xff\xfex", 1)), 422),
    case("overlong utf-8", signed_post(VALID.replace(b"+91", b"\xc0\xab91", 1)), 422),
    case("lone surrogate in id", signed_post(valid_body(message_id="\ud800" + MARKER)), 422),
    case("lone surrogate in text", signed_post(valid_body(text="a\udfff" + MARKER)), 422),
    case("nan", signed_post(VALID[:-1] + b', "extra": NaN}'), 422),
    case("infinity", signed_post(VALID[:-1] + b', "extra": -Infinity}'), 422),
    # Numbers in an ignored field: refusing or ignoring them are both fine.
    case("huge float", signed_post(VALID[:-1] + b', "extra": 1e999999}'), 422, 200),
    case("huge integer", signed_post(VALID[:-1] + b', "x": ' + b"9" * 50000 + b"}"), 422, 200),
    case("number as id", signed_post(valid_body(message_id=10**30)), 422),
    case("nul in id", signed_post(valid_body(message_id="a\x00" + MARKER)), 422),
    case("id too long", signed_post(valid_body(message_id=MARKER * 40)), 422),
    case("not an object", signed_post(b'["' + MARKER.encode() + b'"]'), 422),
    case("empty body", signed_post(b""), 422),
    case("null", signed_post(b"null"), 422),
    case("latin-1", signed_post(VALID, content_type="application/json; charset=latin-1"), 415),
    case("form", signed_post(VALID, content_type="application/x-www-form-urlencoded"), 415),
    # Signatures.
    case("no signature", raw(f"POST /webhook\nContent-Length: {len(VALID)}", VALID), 401),
    case("non-ascii signature", raw("POST /webhook\nX-Signature: " + "é" * 64, VALID), 401),
    case("nul in signature", raw("POST /webhook\nX-Signature: a\x00" + "a" * 62, VALID), 400),
    # Sizes.
    case("declared too large", raw("POST /webhook\nContent-Length: 99999999", VALID), 413),
    case("chunked over the limit", chunked_post(b"x" * 70000), 413),
    case("100-continue", raw("POST /webhook\nExpect: 100-continue\nContent-Length: 9999999"), 413),
    # Just under the limits: served.
    case("60 kB body", signed_post(valid_body(padding="p" * 60_000)), 200),
    case("60 kB of headers", get("/health/live", "\r\n".join(HEADERS[:3000])), 200),
    case("1 MB header", get("/health/live", f"X-Big: {MARKER}{'a' * 1_000_000}"), *TOO_BIG),
    case("10000 headers", get("/health/live", "\r\n".join(HEADERS)), *TOO_BIG),
    case("100 kB url", get("/messages?q=" + MARKER + "a" * 100_000), *TOO_BIG, 414),
    # Framing and smuggling.
    case("length and chunked", chunked_post(VALID, "Content-Length: 5\r\n"), 400, None),
    case("two lengths", raw("POST /webhook\nContent-Length: 5\nContent-Length: 9", VALID), 400),
    case("negative length", raw("POST /webhook\nContent-Length: -1"), 400, None),
    case("bad chunk size", chunked_post(VALID).replace(b"\r\n\r\n", b"\r\n\r\nzz", 1), 400, None),
    case("line folding", get("/health/live", f"X-A: a\r\n b{MARKER}"), 200, 400, None),
    case("bare lf", b"GET /health/live HTTP/1.1\nHost: localhost\n\n", 200, 400, None),
    case("nul in header", get("/health/live", f"X-A: a\x00{MARKER}"), 400, None),
    case("http/0.9", b"GET /health/live\r\n\r\n", 200, 400, None),
    case("http/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, None),
    case("garbage", MARKER.encode() * 100 + b"\r\n\r\n", 400, None),
    case("http/1.0 without host", b"GET /health/live HTTP/1.0\r\n\r\n", 200),
    # Hosts (ALLOWED_HOSTS): a DNS-rebinding page names its own; probes are exempt.
    case("read without host", b"GET /messages HTTP/1.0\r\n\r\n", 400),
    case("rebinding host", get("/messages").replace(b"localhost", b"rebind.example:8000"), 400),
    case("two hosts", get("/stats", "Host: evil.example"), 400),
    case("slash redirect", get(f"/messages/?q={MARKER}").replace(b"localhost", b"e.example"), 400),
    case("trailing slash", get(f"/messages/?q={MARKER}"), 404),
    case("probe by pod ip", get("/health/ready").replace(b"localhost", b"10.0.0.7:8000"), 200),
    # Paths and queries.
    case("non-utf-8 path", b"GET /\xff" + MARKER.encode() + b" HTTP/1.1\r\n\r\n", 400, 404, None),
    case("encoded nul in path", get(f"/webhook%00{MARKER}"), 404),
    case("terminal escapes in path", get(f"/%C2%9B2J%E2%80%AE{MARKER}%1B[0m"), 404),
    case("dot segments", get(f"/../../etc/passwd?{MARKER}"), 404, 400),
    case("absolute-form url", get("http://evil.example/health/live"), 200, 400, 404),
    case("limit too big", get("/messages?limit=" + "9" * 40), 422),
    case("limit not a number", get(f"/messages?limit={MARKER}"), 422),
    case("offset negative", get("/messages?offset=-1"), 422),
    case("from with nul", get(f"/messages?from=%00{MARKER}"), 422),
    case("q invalid utf-8", get(f"/messages?q=%ff%fe{MARKER}"), 200, 422),
    case("q with nul", get(f"/messages?q=a%00{MARKER}"), 422),
    case("since in february 30", get("/messages?since=2025-02-30T00:00:00Z"), 422),
    case("cursor forged", get(f"/messages?cursor={MARKER}"), 422),
    case("repeated params", get("/messages?limit=1&limit=2&limit=" + MARKER), 200, 422),
    case("x-request-id injection", get("/health/live", f"X-Request-ID: {MARKER}<script>"), 200),
]

METHODS = ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp_path: Path = tmp_path_factory.mktemp("hostile")
    with running_server(tmp_path, command=SERVE) as server:
        yield server


def assert_responsive(server: Server) -> None:
    with Connection(server.base_url, timeout=10) as client:
        assert client.request("GET", "/health/live").status == 200


@pytest.mark.parametrize("hostile", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_refused_cleanly(server: Server, hostile: Case) -> None:
    answer = raw_exchange(server.base_url, hostile.request)
    status = status_of(answer)
    assert status in hostile.expected, answer[:300]
    assert MARKER.encode() not in answer
    if status is not None and status != 400:  # 400: uvicorn's own answer to broken HTTP
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert b"x-content-type-options: nosniff" in head
        assert b"cache-control: no-store" in head
        assert b"\r\nserver:" not in head
    assert_responsive(server)


@pytest.mark.parametrize("method", METHODS)
def test_wrong_method_on_webhook_is_405_with_allow(server: Server, method: str) -> None:
    answer = raw_exchange(
        server.base_url, f"{method} /webhook HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    )
    assert status_of(answer) == 405
    assert b"\r\nallow: POST\r\n" in answer


def test_wrong_method_on_a_read_route_is_405_with_allow(server: Server) -> None:
    answer = raw_exchange(
        server.base_url, b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"
    )
    assert status_of(answer) == 405
    assert b"\r\nallow: GET\r\n" in answer


def test_pipelined_requests_are_all_answered(server: Server) -> None:
    requests = get("/health/live") * 3 + get("/health/live", "Connection: close")
    answer = raw_exchange(server.base_url, requests, until_close=True)
    assert answer.count(b"HTTP/1.1 200 OK") == 4


def test_nothing_hostile_reached_the_logs_as_an_error(server: Server) -> None:
    assert_responsive(server)
    samples = scrape(server.base_url, server.log_path)
    assert server.db_path is not None
    with sqlite3.connect(server.db_path) as conn:
        rows = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    conn.close()
    assert metrics_disagreements(samples, server.log_lines(), rows) == []
    lines = [json.loads(line) for line in server.log_lines()]
    assert not [line for line in lines if line.get("status", 0) >= 500]
    assert not [line for line in lines if "traceback" in line or line["logger"] == "app.error"]
    # The path is logged as it came (it is how scanners show up); nothing else may carry
    # what a hostile request sent.
    assert not [line for line in lines if MARKER in json.dumps({**line, "path": ""})]
    # Escape sequences and bidi overrides in a path stay escaped: no raw control or format
    # character in any line a terminal shows.
    unsafe = {"Cc", "Cf", "Zl", "Zp", "Cs"}
    assert not [t for t in server.log_lines() if any(unicodedata.category(c) in unsafe for c in t)]
    record("hostile: raw HTTP inputs tried", len(CASES) + len(METHODS) + 2)
