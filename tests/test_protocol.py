"""The server protocol of `python -m app serve` (app.server), driven in process with a
transport that records every write: what reaches the socket, and in how many calls."""

from __future__ import annotations

import asyncio
import tomllib
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.server import PROTOCOL_UVICORN_MINOR, http_protocol
from app.server.limits import GuardedHttpToolsProtocol, guarded_protocol
from tests.support.clients import make_settings
from tests.support.servers import ROOT

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def small(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"15")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"status":"ok"}'})


async def streamed(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"first", "more_body": True})
    await send({"type": "http.response.body", "body": b"second", "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def no_content(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


GUARDED = guarded_protocol(max_head_bytes=65536, head_timeout=10, body_timeout=30)


async def serve(
    app: Any, request: bytes, protocol_class: type[HttpToolsProtocol] = GUARDED
) -> tuple[HttpToolsProtocol, RecordingTransport]:
    config = Config(
        app=app, lifespan="off", log_config=None, server_header=False, timeout_keep_alive=5
    )
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    await answered(protocol)
    return protocol, transport


async def answered(protocol: HttpToolsProtocol) -> None:
    for _ in range(200):
        if protocol.cycle is not None and protocol.cycle.response_complete:
            return
        await asyncio.sleep(0)
    raise AssertionError("no response")


async def exchange(
    app: Any, request: bytes, protocol_class: type[HttpToolsProtocol] = GUARDED
) -> RecordingTransport:
    protocol, transport = await serve(app, request, protocol_class)
    protocol.connection_lost(None)
    return transport


POST = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


async def test_a_small_response_leaves_in_one_write() -> None:
    transport = await exchange(small, POST)
    (only,) = transport.writes
    assert only.startswith(b"HTTP/1.1 200 OK\r\n")
    assert only.endswith(b'\r\n\r\n{"status":"ok"}')
    assert b"content-length: 15\r\n" in only


async def test_plain_uvicorn_writes_head_and_body_apart() -> None:
    # What the guarded protocol saves, and the check above would see it come back.
    transport = await exchange(small, POST, HttpToolsProtocol)
    assert len(transport.writes) == 2


async def test_a_streamed_body_keeps_its_chunks_in_order() -> None:
    transport = await exchange(streamed, POST)
    everything = b"".join(transport.writes)
    assert everything.startswith(b"HTTP/1.1 200 OK\r\n")
    assert everything.endswith(b"5\r\nfirst\r\n6\r\nsecond\r\n0\r\n\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\n5\r\nfirst\r\n")  # head with the first chunk


async def test_head_requests_and_empty_bodies_still_get_their_head() -> None:
    head = await exchange(small, b"HEAD /webhook HTTP/1.1\r\nHost: x\r\n\r\n")
    (only,) = head.writes
    assert only.startswith(b"HTTP/1.1 200 OK\r\n")
    assert only.endswith(b"\r\n\r\n")
    empty = await exchange(no_content, POST)
    (only,) = empty.writes
    assert only.startswith(b"HTTP/1.1 204 No Content\r\n")


async def test_connection_close_writes_the_response_before_closing() -> None:
    transport = await exchange(
        small,
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
    )
    (only,) = transport.writes
    assert only.endswith(b'{"status":"ok"}')
    assert transport.closed


async def test_keep_alive_serves_the_next_request_the_same_way() -> None:
    transport = await exchange(small, POST + POST)
    assert len(transport.writes) == 2
    assert all(w.endswith(b'{"status":"ok"}') for w in transport.writes)


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout() -> None:
    protocol, transport = await serve(small, POST)
    assert isinstance(protocol, GUARDED)
    now = asyncio.get_running_loop().time()
    protocol.check_deadline(now + 4)
    assert not transport.closed
    protocol.check_deadline(now + 6)
    assert transport.closed
    assert len(transport.writes) == 1  # closed quietly: no 408 for an idle connection
    # uvicorn arms no keep-alive timer of its own here: the sweep is the only one.
    assert protocol.timeout_keep_alive_task is None


async def test_a_request_after_a_pause_gets_the_full_head_timeout() -> None:
    protocol, transport = await serve(small, POST)
    assert isinstance(protocol, GUARDED)
    now = asyncio.get_running_loop().time()
    protocol.data_received(b"POST /webhook HTTP/1.1\r\nHost: x\r\n")  # a head, begun
    protocol.check_deadline(now + 6)  # past the keep-alive timeout: not idle any more
    assert not transport.closed
    protocol.check_deadline(now + 11)  # past the head timeout
    assert transport.closed
    assert transport.writes[-1].startswith(b"HTTP/1.1 408 ")


def test_the_guarded_protocol_is_used_on_the_uvicorn_it_was_written_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    chosen = http_protocol(make_settings(http_max_head_bytes=8192), version="0.54.3")
    assert isinstance(chosen, type)
    assert issubclass(chosen, GuardedHttpToolsProtocol)
    assert chosen.max_head_bytes == 8192
    assert not [r for r in caplog.records if r.name == "app.server"]


@pytest.mark.parametrize("version", ["0.55.0", "0.53.9", "1.0.0"])
def test_another_uvicorn_gets_its_own_protocol_and_one_warning(
    caplog: pytest.LogCaptureFixture, version: str
) -> None:
    assert http_protocol(make_settings(), version=version) == "httptools"
    (warning,) = [r for r in caplog.records if r.name == "app.server"]
    assert warning.levelname == "WARNING"
    assert warning.uvicorn == version  # type: ignore[attr-defined]


def test_pyproject_pins_the_uvicorn_minor_the_guard_expects() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("uvicorn")]
    assert pin == f"uvicorn>={PROTOCOL_UVICORN_MINOR},<0.{int(PROTOCOL_UVICORN_MINOR[2:]) + 1}"
