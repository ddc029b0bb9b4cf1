"""JSON logs (SPEC section 7)."""

from __future__ import annotations

import io
import json
import logging
import re
import time
import unicodedata
from collections.abc import Iterator
from typing import Any

import pytest

from app.logging_utils import FLUSH_SECONDS, AccessLog, configure_logging, safe_line
from tests.support.clients import SECRET, MakeClient, json_lines, message


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    configure_logging("INFO")  # back on stdout for whatever runs next


# Control, format (bidi, zero-width), line and paragraph separators, lone surrogates.
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def access_lines(captured: str) -> list[dict[str, Any]]:
    return [line for line in json_lines(captured) if line.get("logger") == "app.access"]


def test_each_request_logs_one_json_line_with_the_keys(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient
) -> None:
    client = make_client()
    response = client.post_signed(message())
    out = capsys.readouterr().out
    (line,) = access_lines(out)
    assert {"ts", "level", "request_id", "method", "path", "status", "latency_ms"} <= set(line)
    assert line["method"] == "POST"
    assert line["path"] == "/webhook"
    assert line["status"] == 200
    assert line["message_id"] == "m1"
    assert line["dup"] is False
    assert line["result"] == "created"
    assert line["level"] == "INFO"
    assert line["request_id"] == response.headers["x-request-id"]
    assert line["ts"].endswith("Z")


def test_duplicate_and_rejections_are_logged(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient
) -> None:
    client = make_client()
    client.post_signed(message())
    capsys.readouterr()
    client.post_signed(message())
    client.post_signed(message(), secret="wrong")
    client.post_signed(message(ts="bad"))
    dup, bad_sig, invalid = access_lines(capsys.readouterr().out)
    assert (dup["dup"], dup["result"], dup["status"]) == (True, "duplicate", 200)
    # A forged delivery is a WARNING: scanners send them all day, and the error log is
    # for what needs someone.
    assert (bad_sig["result"], bad_sig["status"], bad_sig["level"]) == (
        "invalid_signature",
        401,
        "WARNING",
    )
    assert (invalid["result"], invalid["status"], invalid["level"]) == (
        "validation_error",
        422,
        "WARNING",
    )
    # Where the body is wrong, never what it holds; no message_id when none was read.
    assert invalid["field"] == "ts"
    assert "message_id" not in invalid
    assert "bad" not in json.dumps(invalid)


def test_sane_request_id_is_reused_and_others_replaced(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient
) -> None:
    client = make_client()
    reused = client.get("/health/live", headers={"X-Request-ID": "abc-123.def:4"})
    assert reused.headers["x-request-id"] == "abc-123.def:4"
    for hostile in ["has space", "x" * 200, 'quote"', "new\\nline"]:
        replaced = client.get("/health/live", headers={"X-Request-ID": hostile})
        assert replaced.headers["x-request-id"] != hostile
        assert len(replaced.headers["x-request-id"]) == 32
    ids = [line["request_id"] for line in access_lines(capsys.readouterr().out)]
    assert ids[0] == "abc-123.def:4"
    assert len(set(ids)) == len(ids)


def test_secrets_signatures_and_text_never_reach_the_logs(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient
) -> None:
    client = make_client()
    body = message(text="the-private-text")
    response = client.post_signed(body)
    assert response.status_code == 200
    client.post_signed(message(message_id="m2", text="other-private-text"), secret="wrong")
    client.get("/messages", params={"q": "private-query", "from": "+919876543210"})
    out = capsys.readouterr()
    everything = out.out + out.err
    assert SECRET not in everything
    assert "private-text" not in everything
    assert "private-query" not in everything
    assert "9876543210" not in everything
    from app.signature import sign

    raw = json.dumps(body).encode()
    assert sign(raw, SECRET.encode()) not in everything


def test_log_level_filters(capsys: pytest.CaptureFixture[str], make_client: MakeClient) -> None:
    client = make_client(log_level="WARNING")
    client.get("/health/live")
    client.post_signed(message(), secret="wrong")
    logged = access_lines(capsys.readouterr().out)
    assert [line["status"] for line in logged] == [401]


def after_timestamp(line: str) -> str:
    """The line past its "ts" value: the two lines may straddle a millisecond."""
    head, rest = line.split('Z",', 1)
    assert re.fullmatch(r'\{"ts":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}', head)
    return rest


HOSTILE_VALUES = [
    'quo"te\\back',
    "line\nbreak\ttab\x01",
    "separators \u2028 \u2029 \x85",
    "héllo wörld ✓ 😀",
    "",
    "csi \x9b2J and del \x7f",
    "bidi \u202egnp.exe \u2066isolate\u2069",
    "zero\u200bwidth\u200d joiner \ufeff",
    "tag \U000e0041 lone \ud800",
    "\\u009b, written out as text",
]


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_the_fast_access_line_is_the_formatters_line(value: str) -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream)
    fields: dict[str, Any] = {
        "request_id": "r1",
        "method": "POST",
        "path": "/x" + value,
        "status": 422,
        "latency_ms": 0.125,
        "message_id": value,
        "dup": False,
        "result": value,
        "field": value,
    }
    logging.getLogger("app.access").log(logging.WARNING, "request", extra=fields)
    AccessLog("app.access").request(
        logging.WARNING, "r1", "POST", "/x" + value, 422, 0.125, (value, False, value, value)
    )
    slow, fast = stream.getvalue().split("\n")[:2]
    # The same bytes after the timestamp, and one line each however hostile the values.
    assert after_timestamp(fast) == after_timestamp(slow)
    assert len(stream.getvalue().splitlines()) == 2
    assert json.loads(fast) | {"ts": None} == json.loads(slow) | {"ts": None}
    assert json.loads(fast)["message_id"] == value
    # Nothing a terminal or a reader could act on is left raw.
    assert not any(unicodedata.category(char) in UNSAFE_CATEGORIES for char in fast)


@pytest.mark.parametrize(
    "outcome",
    [
        None,
        (None, True, "duplicate", None),
        ("m1", False, "created", None),
        (None, False, "validation_error", "from"),
        (None, None, "missing_token", None),
    ],
)
def test_the_fast_access_line_is_the_formatters_line_for_every_outcome(
    outcome: tuple[str | None, bool | None, str, str | None] | None,
) -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream)
    fields: dict[str, Any] = {
        "request_id": "r1",
        "method": "GET",
        "path": "/stats",
        "status": 200,
        "latency_ms": 12.5,
    }
    if outcome is not None:
        named = zip(("message_id", "dup", "result", "field"), outcome, strict=True)
        # Absent rather than null when not known.
        fields.update((name, value) for name, value in named if value is not None)
    logging.getLogger("app.access").log(logging.ERROR, "request", extra=fields)
    AccessLog("app.access").request(logging.ERROR, "r1", "GET", "/stats", 200, 12.5, outcome)
    slow, fast = stream.getvalue().splitlines()
    assert after_timestamp(fast) == after_timestamp(slow)


def test_access_lines_wait_and_other_lines_take_them_out_in_order() -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream)
    access = AccessLog("app.access")
    access.request(logging.INFO, "first", "GET", "/", 200, 0.1)
    access.request(logging.INFO, "second", "GET", "/", 200, 0.1)
    assert stream.getvalue() == ""  # held for up to FLUSH_SECONDS
    logging.getLogger("app").info("something else")
    logged = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line.get("request_id", line["msg"]) for line in logged] == [
        "first",
        "second",
        "something else",
    ]
    access.request(logging.WARNING, "urgent", "GET", "/", 404, 0.1)
    assert json.loads(stream.getvalue().splitlines()[-1])["request_id"] == "urgent"


def test_access_lines_reach_the_stream_within_the_flush_interval() -> None:
    stream = io.StringIO()
    configure_logging("INFO", stream)
    AccessLog("app.access").request(logging.INFO, "later", "GET", "/", 200, 0.1)
    deadline = time.monotonic() + 10 * FLUSH_SECONDS
    while not stream.getvalue() and time.monotonic() < deadline:
        time.sleep(FLUSH_SECONDS / 4)
    assert json.loads(stream.getvalue())["request_id"] == "later"


def test_a_logging_setup_that_is_not_ours_gets_the_access_line_as_a_record() -> None:
    configure_logging("INFO", io.StringIO())
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger("app.access")
    keep = Keep()
    logger.addHandler(keep)
    try:
        AccessLog("app.access").request(
            logging.INFO, "r9", "GET", "/", 200, 0.1, ("m", True, "duplicate", None)
        )
    finally:
        logger.removeHandler(keep)
    (record,) = seen
    fields = (record.getMessage(), record.request_id, record.status, record.dup)  # type: ignore[attr-defined]
    assert fields == ("request", "r9", 200, True)


def test_every_control_and_format_character_is_escaped_and_decodes_back() -> None:
    unsafe = [
        chr(code)
        for code in range(0x110000)
        if unicodedata.category(chr(code)) in UNSAFE_CATEGORIES
    ]
    # Spaced out: a lone high surrogate next to a lone low one would decode as a pair.
    value = " ".join(unsafe)
    escaped = safe_line(json.dumps({"v": value}, ensure_ascii=False))
    assert not any(unicodedata.category(char) in UNSAFE_CATEGORIES for char in escaped)
    assert json.loads(escaped) == {"v": value}
    escaped.encode("utf-8")  # a raw lone surrogate could not even be written out
    # Characters that are merely non-ASCII stay as they are, readable.
    assert safe_line('{"v":"héllo ✓ 😀"}') == '{"v":"héllo ✓ 😀"}'


def test_a_hostile_path_reaches_the_access_line_escaped(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient
) -> None:
    client = make_client()
    # CSI 2J (clear the screen) and a right-to-left override that shows "exe.png".
    assert client.get("/%C2%9B2J%E2%80%AEgnp.exe").status_code == 404
    raw = capsys.readouterr().out
    (line,) = [text for text in raw.splitlines() if '"logger":"app.access"' in text]
    assert "\x9b" not in line
    assert "\u202e" not in line
    assert '"path":"/\\u009b2J\\u202egnp.exe"' in line
    assert json.loads(line)["path"] == "/\x9b2J\u202egnp.exe"


def test_a_signed_message_id_reaches_the_access_line_escaped(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient
) -> None:
    client = make_client()
    hostile = "\x9b2J\u202egnp.exe\u200b"
    assert client.post_signed(message(message_id=hostile)).status_code == 200
    raw = capsys.readouterr().out
    (line,) = [text for text in raw.splitlines() if '"logger":"app.access"' in text]
    assert not any(unicodedata.category(char) in UNSAFE_CATEGORIES for char in line)
    assert '"message_id":"\\u009b2J\\u202egnp.exe\\u200b"' in line
    assert json.loads(line)["message_id"] == hostile
    # Stored as sent: the escaping is the log's, not the data's.
    assert client.get("/messages").json()["data"][0]["message_id"] == hostile
