"""Request bodies cost bounded memory and time: a process-wide budget of buffered bytes,
WhatsApp signatures checked as the body streams in, and big batches handled in slices.

Several requests at once are driven straight through the app's ASGI interface, in the
test client's event loop, with bodies that arrive (or stall) exactly when a test says.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence

import pytest
from starlette.types import Message as AsgiMessage

from app.api.whatsapp import store_all
from app.api.whatsapp_batch import SLICE, Batch, parse_batch, read_batch
from app.models import Message
from app.signature import sign
from app.storage import StorageUnavailable
from tests.support.asgi import Reply, call, longest_loop_work, run, streamed
from tests.support.clients import SECRET, MakeClient, message
from tests.support.meta import (
    APP_SECRET,
    PATH,
    VERIFY_TOKEN,
    batch,
    change,
    hub_signature,
    meta_bytes,
    text_message,
)

# Bodies up to 100 kB, and room for 150 kB of them at once.
LIMITS = {
    "whatsapp_max_body_bytes": 100_000,
    "body_buffer_budget_bytes": 150_000,
    "whatsapp_app_secret": APP_SECRET,
    "whatsapp_verify_token": VERIFY_TOKEN,
    # The tests read /metrics without a token (tests/test_access.py covers the guard).
    "allow_open_reads": True,
}


def webhook_body(size: int) -> bytes:
    # Unknown fields are ignored, so padding makes a valid message of any size.
    return json.dumps({**message(message_id=f"pad{size}"), "padding": "x" * size}).encode()


def whatsapp_body(size: int, wamid: str = "wamid.big") -> bytes:
    raw = meta_bytes(batch(change([text_message(wamid, body="x" * 4000)])))
    padded = json.loads(raw)
    padded["padding"] = "y" * max(0, size - len(raw))
    return meta_bytes(padded)


def test_bodies_past_the_budget_are_503_until_the_held_ones_are_done(
    make_client: MakeClient,
) -> None:
    client = make_client(**LIMITS)
    held = whatsapp_body(99_000)
    over = webhook_body(61_000)

    async def scenario() -> list[Reply]:
        go = asyncio.Event()
        slow = asyncio.ensure_future(
            call(
                client,
                PATH,
                {"content-length": str(len(held)), "x-hub-signature-256": hub_signature(held)},
                streamed(held, stall_after=90_000, go=go),
            )
        )
        while client.app_state["body_budget"].held < 90_000:
            await asyncio.sleep(0.01)
        headers = {"content-type": "application/json", "x-signature": sign(over, SECRET.encode())}
        refused = await call(client, "/webhook", headers, streamed(over))
        refused_whatsapp = await call(
            client, PATH, {"x-hub-signature-256": hub_signature(over)}, streamed(over)
        )
        go.set()
        completed = await slow
        retried = await call(client, "/webhook", headers, streamed(over))
        return [refused, refused_whatsapp, completed, retried]

    refused, refused_whatsapp, completed, retried = run(client, scenario)
    for status, headers, body in (refused, refused_whatsapp):
        assert status == 503
        assert headers["retry-after"] == "1"
        assert headers["connection"] == "close"
        assert json.loads(body)["detail"].startswith("server busy")
    assert completed[0] == 200
    assert retried[0] == 200
    assert client.app_state["body_budget"].held == 0
    assert client.metric("webhook_requests_total", result="overloaded") == 1
    assert client.metric("whatsapp_requests_total", result="overloaded") == 1
    assert client.rows() == [("pad61000",), ("wamid.big",)]


def test_a_declared_length_past_the_budget_is_refused_before_any_body(
    make_client: MakeClient,
) -> None:
    client = make_client(**LIMITS)

    async def scenario() -> list[Reply]:
        client.app_state["body_budget"].held = 100_000  # as if other bodies were in flight

        async def never() -> AsgiMessage:
            await asyncio.Event().wait()
            raise AssertionError

        try:
            return [
                await asyncio.wait_for(
                    call(client, path, {"content-length": "60000", **sig}, never), 2
                )
                for path, sig in [
                    ("/webhook", {"x-signature": "0" * 64}),
                    (PATH, {"x-hub-signature-256": "sha256=" + "0" * 64}),
                ]
            ]
        finally:
            client.app_state["body_budget"].held = 0

    for status, headers, _ in run(client, scenario):
        assert status == 503
        assert headers["retry-after"] == "1"


@pytest.mark.parametrize(
    "signature",
    [None, "", "sha256=xyz", "sha1=" + "0" * 40, "sha256=" + "0" * 63],
    ids=["missing", "empty", "not-hex", "sha1", "short"],
)
def test_a_malformed_whatsapp_signature_is_401_before_the_body_is_read(
    make_client: MakeClient, signature: str | None
) -> None:
    client = make_client(**LIMITS)

    async def scenario() -> Reply:
        async def never() -> AsgiMessage:
            await asyncio.Event().wait()
            raise AssertionError

        headers = {"content-length": "90000"}
        if signature is not None:
            headers["x-hub-signature-256"] = signature
        return await asyncio.wait_for(call(client, PATH, headers, never), 2)

    status, headers, body = run(client, scenario)
    assert (status, json.loads(body)) == (401, {"detail": "invalid signature"})
    assert headers["connection"] == "close"
    assert client.metric("whatsapp_requests_total", result="invalid_signature") == 1


def test_the_budget_is_whole_again_after_every_kind_of_answer(make_client: MakeClient) -> None:
    client = make_client(**LIMITS)
    good = meta_bytes(batch(change([text_message("wamid.1")])))
    answers = [
        client.post(PATH, content=good, headers={"X-Hub-Signature-256": hub_signature(good)}),
        client.post(PATH, content=good, headers={"X-Hub-Signature-256": hub_signature(b"x")}),
        client.post(PATH, content=b"[1]", headers={"X-Hub-Signature-256": hub_signature(b"[1]")}),
        client.post(PATH, content=whatsapp_body(100_001)),
        client.post(
            PATH,
            content=whatsapp_body(100_001),
            headers={"X-Hub-Signature-256": hub_signature(b"x")},
        ),
        client.post_signed(message()),
        client.post_signed(b"not json"),
        client.post_signed(webhook_body(70_000)),
    ]
    assert [a.status_code for a in answers] == [200, 401, 422, 401, 413, 200, 422, 413]
    assert client.app_state["body_budget"].held == 0


def test_the_budget_must_hold_the_largest_body(make_client: MakeClient) -> None:
    with pytest.raises(ValueError, match="body_buffer_budget_bytes"):
        make_client(whatsapp_max_body_bytes=4_000_000, body_buffer_budget_bytes=3_000_000)


def big_batch(messages: int) -> bytes:
    item = {"from": "16315551234", "timestamp": "1603059201", "type": "text", "text": {"body": "x"}}
    return meta_bytes(batch(change([{**item, "id": f"w{n:06d}"} for n in range(messages)])))


def test_a_batch_is_read_in_slices_of_bounded_work() -> None:
    batch = Batch()
    steps = []
    reading = read_batch(json.loads(big_batch(20 * SLICE)), batch)
    while True:
        started = time.thread_time()
        try:
            next(reading)
        except StopIteration:
            break
        finally:
            steps.append(time.thread_time() - started)
    assert len(batch.messages) == 20 * SLICE
    assert len(steps) >= 20
    assert max(steps) < sum(steps) / 5


class CountingStore:
    """Takes every insert at once; counts the event loop's turns while a batch is stored."""

    def __init__(self) -> None:
        self.turns = 0
        self.done = False

    async def count_turns(self) -> None:
        while not self.done:
            await asyncio.sleep(0)
            self.turns += 1

    async def insert(self, message: Message) -> bool:
        return True

    async def insert_many(self, messages: Sequence[Message]) -> list[bool | StorageUnavailable]:
        return [True] * len(messages)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_batch_is_stored_a_slice_at_a_time(anyio_backend: str) -> None:
    store = CountingStore()
    counter = asyncio.ensure_future(store.count_turns())
    await asyncio.sleep(0)
    messages = parse_batch(big_batch(10 * SLICE)).messages
    outcomes = await store_all(store, messages)  # type: ignore[arg-type]
    store.done = True
    await counter
    assert outcomes == [True] * len(messages)
    # One turn for others between slices, at least: not every insert started in one go.
    assert store.turns >= 10


@pytest.mark.slow
def test_a_3_mb_batch_does_not_stall_other_requests(make_client: MakeClient) -> None:
    """The longest the event loop's thread works without a turn for anyone else, while a
    3 MB batch goes through: in CPU time, which a busy machine does not inflate. One
    step for the whole batch took over half a second; a generous bound on the slices."""
    client = make_client(
        whatsapp_app_secret=APP_SECRET, whatsapp_verify_token=VERIFY_TOKEN, allow_open_reads=True
    )
    count = 3 * 1024 * 1024 // (len(big_batch(1000)) // 1000) - 100
    raw = big_batch(count)
    assert 3_000_000 < len(raw) <= 3 * 1024 * 1024

    async def scenario() -> tuple[Reply, float]:
        return await longest_loop_work(
            client, PATH, {"x-hub-signature-256": hub_signature(raw)}, raw
        )

    (status, _, _), longest = run(client, scenario)
    assert status == 200
    assert client.rows("SELECT count(*) FROM messages") == [(count,)]
    assert longest < 0.25, f"the event loop worked {longest:.2f} s without a break"
