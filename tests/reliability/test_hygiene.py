"""Hygiene: generic answers to internal errors, nothing private in logs, safe headers, docs off.

The internal errors are forced with tests/support/broken_app.py's store, whose exceptions quote a
phone number and message text: none of it may reach a client or a log line.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from app.config import load_settings
from app.signature import sign
from tests.support.battery import Connection, signed
from tests.support.broken_app import LEAKY_DETAIL, InternalErrorStore
from tests.support.clients import SECRET, MakeClient, message
from tests.support.servers import BROKEN, SERVE, running_server

pytestmark = pytest.mark.reliability

GENERIC_500 = {"detail": "internal server error"}
PHONES = ("+919876543210", "+14155550100")
TEXT = "hygiene-private-text"


def test_forced_internal_errors_answer_a_generic_body(
    make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    client = make_client()
    client.app_state["store"] = InternalErrorStore(client.sqlite_store)
    capsys.readouterr()
    answers = [
        client.post_signed(message(text=TEXT)),
        client.get("/messages", params={"from": PHONES[0]}),
        client.get("/stats"),
    ]
    for response in answers:
        assert response.status_code == 500
        assert response.json() == GENERIC_500
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"
        assert LEAKY_DETAIL not in response.text
    logged = capsys.readouterr()
    everything = logged.out + logged.err
    assert LEAKY_DETAIL not in everything
    assert TEXT not in everything
    errors = [json.loads(line) for line in logged.out.splitlines() if '"unhandled error"' in line]
    assert [line["exc_type"] for line in errors] == ["RuntimeError"] * 3
    assert client.get("/metrics").text.count('http_requests_total{path="/stats",status="500"} 1.0')


def test_a_message_id_with_unicode_line_breaks_stays_on_one_log_line(
    make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    client = make_client()
    capsys.readouterr()
    sneaky = 'a\u2028{"level": "ERROR"}\x85b\u2029c\x1ed\ne'
    assert client.post_signed(message(message_id=sneaky)).status_code == 200
    (line,) = capsys.readouterr().out.splitlines()  # splitlines ends lines at all of them
    assert json.loads(line)["message_id"] == sneaky


@pytest.mark.slow
def test_a_real_server_answers_internal_errors_generically_in_json_logs(tmp_path: Path) -> None:
    env = {"BROKEN_VARIANT": "internal_error"}
    with (
        running_server(tmp_path, command=BROKEN, env=env) as server,
        Connection(server.base_url) as c,
    ):
        body, signature = signed("m1", text=TEXT)
        for reply in [c.post_webhook(body, signature), c.request("GET", "/stats")]:
            assert reply.status == 500
            assert json.loads(reply.body) == GENERIC_500
        server.stop()
        lines = server.log_lines()
    for line in lines:
        json.loads(line)  # every line JSON: no plain-text traceback from the server
    assert not [line for line in lines if LEAKY_DETAIL in line or TEXT in line]


@pytest.mark.slow
def test_no_secret_signature_text_or_phone_number_in_any_log_line(tmp_path: Path) -> None:
    signatures = []
    with (
        running_server(tmp_path, command=SERVE) as server,
        Connection(server.base_url) as client,
    ):

        def deliver(body: bytes, secret: str = SECRET, **headers: str) -> int:
            signature = sign(body, secret.encode())
            signatures.append(signature)
            sent = {"Content-Type": "application/json", "X-Signature": signature, **headers}
            return client.request("POST", "/webhook", body, sent).status

        valid = json.dumps(message(text=TEXT)).encode()
        assert deliver(valid) == 200
        assert deliver(valid) == 200  # duplicate
        assert deliver(valid, secret="wrong-secret") == 401
        assert deliver(json.dumps(message(message_id="m2", ts=TEXT, text=TEXT)).encode()) == 422
        assert deliver(json.dumps(message(message_id="m3", text=TEXT)).encode()[:-3]) == 422
        bad_phone = json.dumps(message(message_id="m4", to="+0" + PHONES[1][2:])).encode()
        assert deliver(bad_phone) == 422
        assert deliver(valid, **{"Content-Type": "text/plain"}) == 415
        assert deliver(json.dumps(message(text="x" * 70_000)).encode()) == 413
        client.close()
        for query in [f"?from={PHONES[0]}&q={TEXT}", f"?from=%2B{PHONES[1][1:]}", f"?q={TEXT}"]:
            assert client.request("GET", "/messages" + query).status == 200
        assert client.request("GET", f"/nowhere?from={PHONES[0]}").status == 404
        assert client.request("GET", f"/messages/{PHONES[0]}").status == 404
        # A locked database makes the service log why writes fail.
        blocker = sqlite3.connect(tmp_path / "app.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            assert deliver(json.dumps(message(message_id="m5", text=TEXT)).encode()) == 503
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        server.stop()
        log = server.log_path.read_text(encoding="utf-8")
    assert log.count("\n") > 15
    assert SECRET not in log
    assert "wrong-secret" not in log
    assert TEXT not in log
    for signature in signatures:
        assert signature not in log
        assert signature.upper() not in log
    for phone in PHONES:
        assert phone[1:] not in log  # not even without its '+'


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/health/live", None, 200),
        ("GET", "/messages?limit=0", None, 422),
        ("GET", "/nowhere", None, 404),
        ("DELETE", "/messages", None, 405),
        ("GET", "/webhook", None, 405),
        ("POST", "/webhook", b"{}", 401),
        ("GET", "/metrics", None, 200),
        ("GET", "/openapi.json", None, 200),
    ],
)
def test_every_response_carries_the_safety_headers(
    make_client: MakeClient, method: str, path: str, body: bytes | None, status: int
) -> None:
    client = make_client()
    response = client.request(method, path, content=body)
    assert response.status_code == status
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    assert "server" not in response.headers


@pytest.mark.slow
def test_the_served_process_sends_no_server_header(tmp_path: Path) -> None:
    with (
        running_server(tmp_path, command=SERVE) as server,
        Connection(server.base_url) as client,
    ):
        for path in ["/health/live", "/nowhere", "/webhook"]:
            reply = client.request("GET", path)
            assert "server" not in reply.headers
            assert reply.headers["x-content-type-options"] == "nosniff"
            assert reply.headers["cache-control"] == "no-store"


def test_docs_can_be_turned_off(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("DATABASE_URL", "sqlite:///:memory:")
    monkeypatch.setenv("DOCS_ENABLED", "false")
    client = make_client(load_settings())
    for path in ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"]:
        assert client.get(path).status_code == 404
    assert client.post_signed(message()).status_code == 200
    monkeypatch.delenv("DOCS_ENABLED")
    on = make_client(load_settings())
    assert on.get("/docs").status_code == 200
    assert on.get("/openapi.json").json()["paths"]["/webhook"]["post"]["operationId"] == "webhook"
