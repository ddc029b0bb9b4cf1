"""The console's live arrivals, from the feed's stream, in a real headless Chromium: new
senders, the list's order and counts, and a stream that ends and comes back.

Skipped, with the reason, where Debian's chromium and chromium-driver are missing.
"""

from __future__ import annotations

import json
import signal
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.support.browser import (
    DESKTOP,
    chromium,
    console_errors,
    count,
    emulate,
    live_state,
    post_signed,
    requests_to,
    texts,
    wait_for,
    why_unavailable,
)
from tests.support.clients import message
from tests.support.console_data import CUSTOMER, seed_console_store
from tests.support.servers import Server, free_port, running_server, start_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(why_unavailable() is not None, reason=str(why_unavailable())),
]

NEWCOMER = "+15557770001"
READ_TOKEN = "console-live-read-token-0123456789"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as driver:
        yield driver


def now(offset_seconds: int = 0) -> str:
    """A `ts` of now: newer than every seeded message, so its sender heads the list."""
    moment = datetime.now(UTC) + timedelta(seconds=offset_seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def send(server: Server, message_id: str, sender: str, text: str, offset: int = 0) -> None:
    body = message(message_id=message_id, ts=now(offset), text=text, **{"from": sender})
    assert post_signed(server, body) == 200


def open_console(driver: Any, server: Server) -> None:
    emulate(driver, width=DESKTOP[0], height=DESKTOP[1], dark=False)
    driver.get("about:blank")
    driver.get_log("browser")  # what an earlier page left behind (its server went away)
    driver.get(server.base_url + "/")
    wait_for(lambda: count(driver, "#conversations li") > 0)
    wait_for(lambda: live_state(driver) == "live")


def first_rows(driver: Any, rows: int) -> list[tuple[str, str]]:
    """(sender, count) of the list's first rows."""
    found: list[list[str]] = driver.execute_script(
        "return [...document.querySelectorAll('#conversations li')].slice(0, arguments[0])"
        ".map(li => [li.dataset.from, li.querySelector('.count').textContent])",
        rows,
    )
    return [(sender, shown) for sender, shown in found]


def heading(driver: Any) -> tuple[int, int]:
    """(senders, messages) as the list's heading says."""
    text: str = driver.find_element("id", "conversation-count").text
    senders, messages = (int(part.split()[0].replace(",", "")) for part in text.split("·"))
    return senders, messages


@pytest.mark.parametrize(
    "every_sender_shown",
    [
        # More senders than a page: the newcomer's count is read from the service.
        pytest.param(False, id="senders-beyond-the-first-page"),
        # Every sender on the page: a sender it does not know is new, counted here.
        pytest.param(True, id="every-sender-on-the-page"),
    ],
)
def test_two_messages_from_a_new_sender_put_it_on_top_counting_two(
    browser: Any, tmp_path: Path, every_sender_shown: bool
) -> None:
    db = tmp_path / "app.db"
    if not every_sender_shown:
        seed_console_store(db, bulk=300)
    with running_server(tmp_path, db_path=db) as server:
        if every_sender_shown:
            for index in range(3):
                send(server, f"old-{index}", CUSTOMER, f"earlier {index}", offset=-60)
        open_console(browser, server)
        senders, messages = heading(browser)
        top = first_rows(browser, 1)[0]
        assert top[0] == CUSTOMER
        reads = requests_to(browser, "stats", "conversations", "messages")
        send(server, "new-1", NEWCOMER, "first of two")
        send(server, "new-2", NEWCOMER, "second of two", offset=1)
        wait_for(lambda: first_rows(browser, 2) == [(NEWCOMER, "2"), top], 5)
        assert texts(browser, "#conversations li:first-child .preview") == ["second of two"]
        assert heading(browser) == (senders + 1, messages + 2)
        assert browser.find_element("id", "rate").text == "2"
        # Through the stream: /stats and the list were not read again; only a sender the
        # page could not know about was looked up, once.
        looked_up = 0 if every_sender_shown else 1
        assert requests_to(browser, "stats", "conversations", "messages") == [
            reads[0],
            reads[1],
            reads[2] + looked_up,
        ]
        assert console_errors(browser) == []


# Run before the page's own scripts: the list and /stats are read a second after they are
# asked for, so that a message stored meanwhile is both in them and after the head.
SLOW_LIST = """
const original = window.fetch;
window.fetch = async (url, options) => {
  if (/^(conversations|stats)\\b/.test(String(url))) await new Promise(r => setTimeout(r, 1000));
  return original(url, options);
};
"""


def test_a_message_in_both_the_list_and_the_stream_counts_once(
    browser: Any, tmp_path: Path
) -> None:
    with running_server(tmp_path) as server:
        for index in range(3):
            send(server, f"old-{index}", CUSTOMER, f"earlier {index}", offset=-60)
        emulate(browser, width=DESKTOP[0], height=DESKTOP[1], dark=False)
        browser.get("about:blank")
        browser.get_log("browser")
        script = browser.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument", {"source": SLOW_LIST}
        )
        try:
            browser.get(server.base_url + "/")
            wait_for(lambda: requests_to(browser, "feed/head") == [1], 5)
            assert count(browser, "#conversations li") == 0  # the list is not read yet
            send(server, "between", CUSTOMER, "after the head, before the list")
            wait_for(lambda: live_state(browser) == "live")
            position = feed_position(server, "between")
            wait_for(
                lambda: (
                    int(browser.find_element("id", "live").get_attribute("data-position") or 0)
                    >= position
                ),
                5,
            )
        finally:
            browser.execute_cdp_cmd(
                "Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]}
            )
        # The list has it, the stream brought it again: counted once, drawn once.
        assert first_rows(browser, 1) == [(CUSTOMER, "4")]
        assert heading(browser) == (1, 4)
        assert browser.find_element("id", "rate").text == "0"
        assert console_errors(browser) == []


def feed_position(server: Server, message_id: str) -> int:
    with urllib.request.urlopen(server.base_url + "/feed?limit=1000", timeout=10) as response:  # noqa: S310
        items = json.load(response)["data"]
    (position,) = [item["position"] for item in items if item["message_id"] == message_id]
    return int(position)


def test_the_stream_comes_back_after_a_restart_and_misses_nothing(
    browser: Any, tmp_path: Path
) -> None:
    db = tmp_path / "app.db"
    port = free_port()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = start_server(tmp_path / "one", db_path=db, port=port)
    try:
        send(first, "before", NEWCOMER, "before the restart")
        open_console(browser, first)
        # SIGTERM ends the stream cleanly; the browser tries again, and is refused.
        first.stop(signal.SIGTERM)
        wait_for(lambda: live_state(browser) == "reconnecting", 10)
        assert browser.find_element("id", "live-state").text == "reconnecting"
    finally:
        if first.process.poll() is None:
            first.process.kill()
            first.process.wait()
    with running_server(tmp_path / "two", db_path=db, port=port) as second:
        # Stored whether or not the page is back yet: it resumes after its last id.
        send(second, "during", NEWCOMER, "while it was away", offset=1)
        wait_for(lambda: live_state(browser) == "live", 15)
        wait_for(lambda: first_rows(browser, 1) == [(NEWCOMER, "2")], 5)
        send(second, "after", NEWCOMER, "once it was back", offset=2)
        wait_for(lambda: first_rows(browser, 1) == [(NEWCOMER, "3")], 5)
        assert browser.find_element("id", "live-state").text == "live"
    browser.get_log("browser")  # the refused connections while it was down are expected


def test_a_stream_refused_for_an_ended_session_signs_in_again_and_resumes(
    browser: Any, tmp_path: Path
) -> None:
    db = tmp_path / "app.db"
    port = free_port()
    env = {"READ_TOKENS": READ_TOKEN}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first = start_server(tmp_path / "one", db_path=db, port=port, env=env)
    try:
        send(first, "before", NEWCOMER, "before the restart")
        emulate(browser, width=DESKTOP[0], height=DESKTOP[1], dark=False)
        browser.delete_all_cookies()
        browser.get(first.base_url + "/")
        sign_in(browser)
        wait_for(lambda: live_state(browser) == "live")
        # The session ends (as when it expires), then the stream is cut: the browser's
        # own retry is refused with a 401, and EventSource gives up for good.
        browser.delete_all_cookies()
        first.stop(signal.SIGTERM)
        wait_for(lambda: live_state(browser) == "reconnecting", 10)
    finally:
        if first.process.poll() is None:
            first.process.kill()
            first.process.wait()
    with running_server(tmp_path / "two", db_path=db, port=port, env=env) as second:
        send(second, "during", NEWCOMER, "while it was away", offset=1)
        # The page reopens the stream itself, and asks for the token first.
        sign_in(browser)
        wait_for(lambda: live_state(browser) == "live", 15)
        wait_for(lambda: first_rows(browser, 1) == [(NEWCOMER, "2")], 5)
        send(second, "after", NEWCOMER, "once it was back", offset=2)
        wait_for(lambda: first_rows(browser, 1) == [(NEWCOMER, "3")], 5)
    browser.get_log("browser")  # the 401s and refused connections are expected


def sign_in(driver: Any) -> None:
    wait_for(lambda: driver.find_element("id", "sign-in").is_displayed(), 20)
    token = driver.find_element("id", "sign-in-token")
    token.send_keys(READ_TOKEN)
    driver.find_element("css selector", "#sign-in-form button").click()
    wait_for(lambda: not driver.find_element("id", "sign-in").is_displayed())
