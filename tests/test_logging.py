"""JSON logs (SPEC section 7)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import SECRET, AppClient, message


def lines(captured: str) -> list[dict[str, Any]]:
    parsed = [json.loads(line) for line in captured.splitlines() if line.strip()]
    assert parsed
    return parsed


def access_lines(captured: str) -> list[dict[str, Any]]:
    return [line for line in lines(captured) if line.get("logger") == "app.access"]


def test_each_request_logs_one_json_line_with_the_keys(
    capsys: pytest.CaptureFixture[str], make_client: AppClient
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
    capsys: pytest.CaptureFixture[str], make_client: AppClient
) -> None:
    client = make_client()
    client.post_signed(message())
    capsys.readouterr()
    client.post_signed(message())
    client.post_signed(message(), secret="wrong")
    client.post_signed(message(ts="bad"))
    dup, bad_sig, invalid = access_lines(capsys.readouterr().out)
    assert (dup["dup"], dup["result"], dup["status"]) == (True, "duplicate", 200)
    assert (bad_sig["result"], bad_sig["status"], bad_sig["level"]) == (
        "invalid_signature",
        401,
        "ERROR",
    )
    assert (invalid["result"], invalid["status"], invalid["level"]) == (
        "validation_error",
        422,
        "WARNING",
    )


def test_sane_request_id_is_reused_and_others_replaced(
    capsys: pytest.CaptureFixture[str], make_client: AppClient
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
    capsys: pytest.CaptureFixture[str], make_client: AppClient
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


def test_log_level_filters(capsys: pytest.CaptureFixture[str], make_client: AppClient) -> None:
    client = make_client(log_level="WARNING")
    client.get("/health/live")
    client.post_signed(message(), secret="wrong")
    logged = access_lines(capsys.readouterr().out)
    assert [line["status"] for line in logged] == [401]
