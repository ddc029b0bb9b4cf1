"""Who may read: READ_TOKENS, METRICS_TOKEN, ALLOWED_HOSTS (app/access.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.types import Message

from app.access import HostAllowlist, host_name
from app.main import create_app
from tests.support.battery import raw_exchange, status_of
from tests.support.clients import SECRET, AppClient, MakeClient, json_lines, make_settings, message
from tests.support.meta import APP_SECRET, VERIFY_TOKEN
from tests.support.servers import SERVE, UVICORN, free_port, run_module, running_server

READ = "read-token-0123456789abcdef"
NEXT = "next-read-token-fedcba9876543210"
SCRAPE = "metrics-token-0123456789abcdef"
REALM = 'Bearer realm="webhook-receiver"'
UNAUTHORIZED = {"detail": "missing or invalid bearer token"}
READ_PATHS = ["/messages", "/stats", "/docs", "/redoc", "/openapi.json"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def locked_client(make_client: MakeClient, **settings: Any) -> AppClient:
    client = make_client(read_tokens=f"{READ},{NEXT}", **settings)
    client.read_token = READ
    return client


@pytest.fixture
def locked(make_client: MakeClient) -> AppClient:
    return locked_client(make_client)


def refusals(client: AppClient, reason: str) -> float:
    return client.metric("access_refusals_total", reason=reason)


# Open by default, and saying so


def test_without_read_tokens_reads_stay_open_and_start_up_warns_once(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient
) -> None:
    client = make_client()
    for path in [*READ_PATHS, "/metrics"]:
        assert client.get(path).status_code == 200, path
    warned = [line for line in json_lines(capsys.readouterr().out) if line["level"] == "WARNING"]
    open_reads = [line for line in warned if line.get("setting") == "READ_TOKENS"]
    assert len(open_reads) == 1
    assert "READ_TOKENS" in open_reads[0]["msg"]


def test_with_read_tokens_there_is_no_open_reads_warning(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient
) -> None:
    make_client(read_tokens=READ)
    lines = json_lines(capsys.readouterr().out)
    assert not [line for line in lines if line.get("setting") == "READ_TOKENS"]


# Locked


@pytest.mark.parametrize(
    "path", [*READ_PATHS, "/metrics", "/messages/", "/no-such-path", "/static", "/sessions"]
)
def test_every_read_needs_a_token_once_read_tokens_is_set(locked: AppClient, path: str) -> None:
    response = locked.get(path, params={"limit": "100"})
    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED
    assert response.headers["www-authenticate"] == REALM
    assert "x-request-id" in response.headers


def test_a_read_endpoint_added_later_is_locked_without_doing_anything() -> None:
    app = create_app(make_settings(read_tokens=READ))
    later = APIRouter()

    @later.get("/reports")
    async def reports() -> dict[str, str]:
        return {"report": "rows"}

    app.include_router(later)
    with AppClient(app) as client:
        client.read_token = READ
        assert client.get("/reports").status_code == 401
        assert client.get("/reports", headers=bearer(READ)).json() == {"report": "rows"}
        assert client.metric("http_requests_total", path="/reports", status="401") == 1


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer wrong-token-0123456789abcdef",
        f"Bearer {READ}x",
        f"Bearer {READ[:-1]}",
        "Bearer ",
        f"bearer {READ.upper()}",
    ],
)
def test_a_wrong_bearer_token_is_401_invalid_token(locked: AppClient, authorization: str) -> None:
    response = locked.get("/messages", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED
    assert response.headers["www-authenticate"] == REALM + ', error="invalid_token"'


@pytest.mark.parametrize("authorization", [f"Basic {READ}", READ, "Token abc"])
def test_another_scheme_is_401_like_no_credential(locked: AppClient, authorization: str) -> None:
    response = locked.get("/stats", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED
    assert response.headers["www-authenticate"] == REALM


def test_two_authorization_headers_are_refused(locked: AppClient) -> None:
    headers = [("Authorization", f"Bearer {READ}"), ("Authorization", "Bearer other")]
    assert locked.get("/stats", headers=headers).status_code == 401


@pytest.mark.parametrize("token", [READ, NEXT])
def test_each_token_of_a_rotation_reads(locked: AppClient, token: str) -> None:
    assert locked.post_signed(message()).status_code == 200
    for scheme in ["Bearer", "bearer", "BEARER"]:
        headers = {"Authorization": f"{scheme} {token}"}
        assert locked.get("/messages", headers=headers).json()["total"] == 1
        assert locked.get("/stats", headers=headers).json()["total_messages"] == 1
        for path in ["/docs", "/redoc", "/openapi.json", "/metrics"]:
            assert locked.get(path, headers=headers).status_code == 200, path


def test_senders_and_probes_need_no_token(make_client: MakeClient) -> None:
    client = make_client(
        read_tokens=READ, whatsapp_app_secret=APP_SECRET, whatsapp_verify_token=VERIFY_TOKEN
    )
    assert client.post_signed(message()).json() == {"status": "ok"}
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 200
    assert client.head("/health/ready").status_code == 200
    handshake = client.get(
        "/webhook/whatsapp",
        params={"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "7"},
    )
    assert handshake.text == "7"
    # Unsigned, so refused by the signature check, not by the guard.
    assert client.post("/webhook/whatsapp", content=b"{}").json() == {"detail": "invalid signature"}


def test_a_refusal_is_counted_and_logged_without_the_token(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient
) -> None:
    locked = locked_client(make_client)
    capsys.readouterr()
    locked.get("/messages")
    locked.get("/messages", headers=bearer("guessed-token-0123456789"))
    logged = [
        line for line in json_lines(capsys.readouterr().out) if line["logger"] == "app.access"
    ]
    assert [(line["status"], line["result"], line["level"]) for line in logged] == [
        (401, "missing_token", "WARNING"),
        (401, "invalid_token", "WARNING"),
    ]
    # A refused read is no webhook: no dup in its line.
    assert all("dup" not in line for line in logged)
    assert refusals(locked, "missing_token") == 1
    assert refusals(locked, "invalid_token") == 1
    # Counted under its route template, so a dashboard sees which endpoint was refused.
    assert locked.metric("http_requests_total", path="/messages", status="401") == 2
    locked.get("/metrics", headers=bearer(READ))
    out = capsys.readouterr()
    assert "guessed-token" not in out.out + out.err
    assert READ not in out.out + out.err


# /metrics


def test_metrics_token_opens_metrics_alone(make_client: MakeClient) -> None:
    client = make_client(read_tokens=READ, metrics_token=SCRAPE)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer(SCRAPE)).status_code == 200
    assert client.get("/metrics", headers=bearer(READ)).status_code == 200
    for path in READ_PATHS:
        assert client.get(path, headers=bearer(SCRAPE)).status_code == 401, path


def test_metrics_token_without_read_tokens_locks_metrics_alone(make_client: MakeClient) -> None:
    client = make_client(metrics_token=SCRAPE)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=bearer(SCRAPE)).status_code == 200
    assert client.get("/messages").status_code == 200


def test_refusal_counters_exist_from_start_up(locked: AppClient) -> None:
    text = locked.get("/metrics", headers=bearer(READ)).text
    for reason in ["invalid_host", "missing_token", "invalid_token"]:
        assert f'access_refusals_total{{reason="{reason}"}} 0.0' in text


# The Host allowlist


NOT_ALLOWED = [
    "rebind.attacker.example:8000",
    "rebind.attacker.example",
    "localhost.attacker.example",
    "127.0.0.2:8000",
    "[::2]:8000",
    "localhost:80:80",
    "localhost:http",
    "[::1",
    "",
    "evil.example/localhost",
]
REFUSED_REQUESTS = [
    ("GET", "/messages"),
    ("GET", "/stats"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/messages/"),
    ("GET", "/nothing"),
    ("POST", "/webhook"),
]


def test_a_host_not_allowed_is_400_before_any_route(make_client: MakeClient) -> None:
    client = make_client()
    assert client.post_signed(message()).status_code == 200
    for host in NOT_ALLOWED:
        for method, path in REFUSED_REQUESTS:
            response = client.request(method, path, headers={"Host": host}, content=b"{}")
            assert response.status_code == 400, (host, method, path)
            assert response.json() == {"detail": "host not allowed"}
            assert response.headers["connection"] == "close"
            assert "location" not in response.headers
    assert refusals(client, "invalid_host") == len(NOT_ALLOWED) * len(REFUSED_REQUESTS)
    assert client.rows() == [("m1",)]


def test_loopback_names_are_allowed_by_default(make_client: MakeClient) -> None:
    client = make_client()
    hosts = ["localhost", "localhost:8000", "LOCALHOST:8000", "localhost.", "127.0.0.1:18500"]
    for number, host in enumerate([*hosts, "[::1]:8000"]):
        assert client.get("/stats", headers={"Host": host}).status_code == 200, host
        sent = client.post_signed(message(message_id=f"m{number}"), headers={"Host": host})
        assert sent.status_code == 200, host


def test_probes_answer_whatever_the_host(make_client: MakeClient) -> None:
    client = make_client(read_tokens=READ)
    for host in ["10.1.2.3:8000", "pod.internal", ""]:
        assert client.get("/health/live", headers={"Host": host}).status_code == 200
        assert client.get("/health/ready", headers={"Host": host}).status_code == 200


def test_allowed_hosts_names_the_public_host(make_client: MakeClient) -> None:
    client = make_client(allowed_hosts="receiver.example.com, .corp.example")
    for host in [
        "receiver.example.com",
        "Receiver.Example.Com:443",
        "corp.example",
        "a.corp.example",
    ]:
        assert client.get("/stats", headers={"Host": host}).status_code == 200, host
    for host in ["localhost", "example.com", "xcorp.example", "receiver.example.com.evil"]:
        assert client.get("/stats", headers={"Host": host}).status_code == 400, host


def test_a_star_turns_the_host_check_off(make_client: MakeClient) -> None:
    client = make_client(allowed_hosts="*")
    assert client.get("/stats", headers={"Host": "anything.example"}).status_code == 200


def test_the_host_check_comes_before_the_token_check(locked: AppClient) -> None:
    response = locked.get("/messages", headers={"Host": "evil.example", **bearer(READ)})
    assert response.status_code == 400


@pytest.mark.parametrize(
    ("header", "name"),
    [
        (b"localhost", b"localhost"),
        (b"LocalHost:8000", b"localhost"),
        (b"localhost.:1", b"localhost"),
        (b"[::1]:8000", b"[::1]"),
        (b"[::1]", b"[::1]"),
        (b"localhost:", b"localhost"),
        (b"localhost:123456", None),
        (b"localhost:-1", None),
        (b"[::1]x", None),
        (b"[::1", None),
        (b":8000", None),
    ],
)
def test_host_names_are_read_strictly(header: bytes, name: bytes | None) -> None:
    assert host_name(header) == name


def test_a_request_without_host_or_with_two_is_400() -> None:
    app = create_app(make_settings())

    async def call(headers: list[tuple[bytes, bytes]]) -> list[Message]:
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "http_version": "1.0",
            "method": "GET",
            "path": "/messages",
            "raw_path": b"/messages",
            "root_path": "",
            "query_string": b"",
            "headers": headers,
        }
        await app(scope, receive, send)
        return sent

    for headers in [[], [(b"host", b"localhost"), (b"host", b"evil.example")]]:
        start, body = asyncio.run(call(headers))
        assert start["status"] == 400
        assert json.loads(body["body"]) == {"detail": "host not allowed"}


# No slash redirects


def test_a_trailing_slash_is_404_never_a_redirect_built_from_host(make_client: MakeClient) -> None:
    client = make_client(allowed_hosts="*")
    for host in ["localhost", "evil.example"]:
        response = client.get(
            "/messages/", params={"q": "x"}, headers={"Host": host}, follow_redirects=False
        )
        assert response.status_code == 404
        assert "location" not in response.headers


def test_a_trailing_slash_is_404_for_a_reader_with_a_token(locked: AppClient) -> None:
    response = locked.get("/stats/", headers=bearer(READ), follow_redirects=False)
    assert response.status_code == 404


# A public endpoint means a deliberate choice about reads


def test_whatsapp_without_read_tokens_needs_allow_open_reads() -> None:
    whatsapp = {"whatsapp_app_secret": APP_SECRET, "whatsapp_verify_token": VERIFY_TOKEN}
    with pytest.raises(ValueError, match="READ_TOKENS") as caught:
        make_settings(**whatsapp)
    assert "ALLOW_OPEN_READS" in str(caught.value)
    assert make_settings(**whatsapp, read_tokens=READ).whatsapp_enabled
    assert make_settings(**whatsapp, allow_open_reads=True).whatsapp_enabled


def test_secret_is_not_mistaken_for_a_token(locked: AppClient) -> None:
    assert locked.get("/messages", headers=bearer(SECRET)).status_code == 401


# Start-up, as a process


WHATSAPP_ENV = {"WHATSAPP_APP_SECRET": APP_SECRET, "WHATSAPP_VERIFY_TOKEN": VERIFY_TOKEN}


@pytest.mark.slow
@pytest.mark.parametrize("command", [UVICORN, ("app", "serve", "--port")])
def test_a_public_endpoint_with_open_reads_refuses_to_start(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    env = {"WEBHOOK_SECRET": "s3cr3t-value", "DATABASE_URL": f"sqlite:///{tmp_path}/a.db"}
    result = run_module({**env, **WHATSAPP_ENV}, *command, str(free_port()))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert json.loads(line)["level"] == "CRITICAL"
    assert "READ_TOKENS" in line
    assert "ALLOW_OPEN_READS" in line
    assert "Traceback" not in result.stderr + result.stdout
    assert APP_SECRET not in result.stderr + result.stdout


@pytest.mark.slow
def test_the_black_box_configuration_from_files(tmp_path: Path) -> None:
    """READ_TOKENS, METRICS_TOKEN, ALLOWED_HOSTS and WhatsApp, the secrets from files."""
    files = {"WEBHOOK_SECRET": SECRET, "READ_TOKENS": f"{READ},{NEXT}", "METRICS_TOKEN": SCRAPE}
    env = {**WHATSAPP_ENV, "ALLOWED_HOSTS": "localhost,127.0.0.1,receiver.example"}
    for name, value in files.items():
        (tmp_path / name).write_text(value + "\n")
        env[f"{name}_FILE"] = str(tmp_path / name)
    env["WEBHOOK_SECRET"] = ""  # as Compose passes an unset one: not a second value
    with running_server(tmp_path, env=env, command=SERVE) as server:
        url = server.base_url
        assert raw_status(url, "GET /messages?limit=100 HTTP/1.1\r\nHost: localhost") == 401
        ok = f"GET /messages HTTP/1.1\r\nHost: receiver.example:443\r\nAuthorization: Bearer {NEXT}"
        assert raw_status(url, ok) == 200
        rebound = f"GET /messages HTTP/1.1\r\nHost: rebind.attacker.example:8000\r\n{bearer_line()}"
        assert raw_status(url, rebound) == 400
        assert raw_status(url, f"GET /messages HTTP/1.0\r\n{bearer_line()}") == 400
        assert raw_status(url, "GET /health/ready HTTP/1.0") == 200
        assert raw_status(url, "GET /messages/?q=x HTTP/1.1\r\nHost: evil.example") == 400
        scrape = f"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {SCRAPE}"
        assert raw_status(url, scrape) == 200
        assert (
            raw_status(url, f"GET /stats HTTP/1.1\r\nHost: localhost\r\n{bearer_line(SCRAPE)}")
            == 401
        )
        server.stop()
    logged = "\n".join(server.log_lines())
    for secret in [SECRET, READ, NEXT, SCRAPE, APP_SECRET]:
        assert secret not in logged
    assert '"setting":"WEBHOOK_SECRET"' in logged  # testsecret is short: warned, not refused


def bearer_line(token: str = READ) -> str:
    return f"Authorization: Bearer {token}"


def raw_status(base_url: str, head: str) -> int | None:
    return status_of(raw_exchange(base_url, (head + "\r\n\r\n").encode()))


def test_the_host_cache_keeps_only_allowed_values_and_is_bounded() -> None:
    hosts = HostAllowlist(frozenset({"localhost"}))
    for number in range(1000):
        assert not hosts.allows(b"rebind%d.example" % number)
    assert hosts.seen == set()
    for port in range(1000):
        assert hosts.allows(b"localhost:%d" % port)
    assert len(hosts.seen) == 64
    assert not hosts.allows(None)


def test_a_websocket_is_held_to_the_same_rule() -> None:
    app = create_app(make_settings(read_tokens=READ))
    feed = APIRouter()

    @feed.websocket("/live")
    async def live(socket: WebSocket) -> None:
        await socket.accept()
        await socket.send_text("rows")
        await socket.close()

    app.include_router(feed)
    with AppClient(app) as client:
        with pytest.raises(WebSocketDisconnect) as refused:
            client.websocket_connect("ws://localhost/live").__enter__()
        assert refused.value.code == 1008
        with client.websocket_connect("ws://localhost/live", headers=bearer(READ)) as socket:
            assert socket.receive_text() == "rows"
        with pytest.raises(WebSocketDisconnect):
            client.websocket_connect("ws://evil.example/live", headers=bearer(READ)).__enter__()
