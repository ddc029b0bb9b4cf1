"""`python -m app follow`: JSON lines in feed order, resuming from its position file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.feed import write_concurrently
from tests.support.servers import ROOT, running_server

pytestmark = pytest.mark.slow


def start_follow(url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    unset = {"WEBHOOK_SECRET", "READ_TOKEN", "READ_TOKENS", "READ_TOKENS_FILE"}
    env = {**{k: v for k, v in os.environ.items() if k not in unset}, **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "app", "follow", "--url", url, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C, as at a terminal: a shell running the suite in the background starts it
        # with SIGINT ignored, which its children would inherit.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def lines(process: subprocess.Popen[str], count: int) -> list[dict[str, Any]]:
    assert process.stdout is not None
    return [json.loads(process.stdout.readline()) for _ in range(count)]


def interrupt(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    _, errors = process.communicate(timeout=15)
    return process.returncode, errors


def test_follow_prints_each_message_once_and_resumes_from_its_file(tmp_path: Path) -> None:
    position_file = tmp_path / "position"
    with running_server(tmp_path) as server:
        write_concurrently([server.base_url], 3, writers=1, prefix="a")
        follower = start_follow(server.base_url, "--position-file", str(position_file))
        first = lines(follower, 3)
        write_concurrently([server.base_url], 1, writers=1, prefix="b")
        first += lines(follower, 1)  # a live one, through the long poll
        # Saved right after the batch is printed (a restart may print it once more).
        saved = f"{first[-1]['position']}\n"
        deadline = time.monotonic() + 10
        while position_file.read_text() != saved and time.monotonic() < deadline:
            time.sleep(0.05)
        code, errors = interrupt(follower)
        assert (code, errors) == (0, "")
        assert position_file.read_text() == saved

        write_concurrently([server.base_url], 2, writers=1, prefix="c")
        again = start_follow(server.base_url, "--position-file", str(position_file))
        second = lines(again, 2)
        assert interrupt(again)[0] == 0
    assert [item["message_id"] for item in first + second] == ["a0", "a1", "a2", "b0", "c0", "c1"]
    assert set(first[0]) == {"position", "message_id", "from", "to", "ts", "text", "received_at"}


def test_follow_says_what_is_wrong_with_a_refused_request(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        follower = start_follow(server.base_url, "--from", "12345")
        _, errors = follower.communicate(timeout=15)
        assert follower.returncode == 1
        assert "GET /feed answered 422" in errors


def test_follow_sends_read_token_as_a_bearer_token(tmp_path: Path) -> None:
    token = "follow-read-token-0123456789"
    with running_server(tmp_path, env={"READ_TOKENS": token}) as server:
        write_concurrently([server.base_url], 1, writers=1, prefix="a")
        refused = start_follow(server.base_url)
        _, errors = refused.communicate(timeout=15)
        assert refused.returncode == 1
        assert "answered 401" in errors
        assert "READ_TOKEN" in errors
        follower = start_follow(server.base_url, env={"READ_TOKEN": token})
        assert lines(follower, 1)[0]["message_id"] == "a0"
        assert interrupt(follower)[0] == 0
