"""`python -m app sign | send | demo`, against a real server process."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.cli import EXIT_OK, EXIT_UNEXPECTED, EXIT_UNREACHABLE, EXIT_USAGE, main
from app.signature import sign
from tests.support.clients import SECRET
from tests.support.servers import ROOT, Server, free_port, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module; each test uses its own message ids."""
    with running_server(tmp_path_factory.mktemp("cli")) as live:
        yield live


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)


def stored(server: Server, message_id: str) -> list[tuple[str, str, str, str, str | None]]:
    assert server.db_path is not None
    with sqlite3.connect(server.db_path) as conn:
        rows: list[tuple[str, str, str, str, str | None]] = conn.execute(
            "SELECT message_id, from_msisdn, to_msisdn, ts, text FROM messages"
            " WHERE message_id = ?",
            (message_id,),
        ).fetchall()
    return rows


def run_cli(
    *args: str, env: dict[str, str], python: tuple[str, ...] = (sys.executable,)
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*python, "-m", "app", *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# sign


def test_sign_prints_the_hmac_of_stdin_and_of_a_file(tmp_path: Path) -> None:
    body = b'{"message_id":"m1"}'
    path = tmp_path / "body.json"
    path.write_bytes(body)
    expected = sign(body, SECRET.encode())
    from_file = run_cli("sign", str(path), env={"WEBHOOK_SECRET": SECRET})
    assert (from_file.returncode, from_file.stdout) == (0, expected + "\n")
    from_stdin = subprocess.run(
        [sys.executable, "-m", "app", "sign"],
        cwd=ROOT,
        env={"WEBHOOK_SECRET": SECRET},
        input=body,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (from_stdin.returncode, from_stdin.stdout.decode()) == (0, expected + "\n")


def test_sign_without_a_secret_or_a_readable_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WEBHOOK_SECRET", raising=False)
    assert main(["sign", str(tmp_path / "missing.json")]) == EXIT_USAGE
    assert "WEBHOOK_SECRET is not set" in capsys.readouterr().err
    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
    assert main(["sign", str(tmp_path / "missing.json")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "cannot read" in err
    assert "Traceback" not in err


# init-db


def test_init_db_applies_the_schema_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "nested" / "app.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{path}")
    assert main(["init-db"]) == EXIT_OK
    first = capsys.readouterr().out
    assert main(["init-db"]) == EXIT_OK
    assert capsys.readouterr().out == first
    assert first.startswith("schema version ")
    with sqlite3.connect(path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "messages" in tables


def test_init_db_refuses_an_unknown_database_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://db/app")
    assert main(["init-db"]) == EXIT_USAGE
    line = json.loads(capsys.readouterr().err)
    assert line["msg"].startswith("invalid configuration: DATABASE_URL: unsupported scheme")


# send


@pytest.mark.slow
@pytest.mark.usefixtures("secret_env")
def test_send_posts_a_signed_message_that_is_stored(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["send", "--url", server.base_url, "--message-id", "send-1", "--from", "+447700900123"]
    argv += ["--to", "+14155550100", "--ts", "2025-01-15T10:00:00Z", "--text", "Grüße"]
    assert main(argv) == EXIT_OK
    assert capsys.readouterr().out == '200 {"status":"ok"}\n'
    assert stored(server, "send-1") == [
        ("send-1", "+447700900123", "+14155550100", "2025-01-15T10:00:00Z", "Grüße")
    ]
    # A redelivery is answered the same way and stores nothing more.
    assert main(argv) == EXIT_OK
    assert len(stored(server, "send-1")) == 1


@pytest.mark.slow
@pytest.mark.usefixtures("secret_env")
def test_send_defaults_give_a_fresh_id_and_now(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["send", "--url", server.base_url + "/", "--no-text"]) == EXIT_OK
    err = dict(line.split(" ", 1) for line in capsys.readouterr().err.splitlines())
    message_id = err["message_id"]
    assert message_id.startswith("cli-")
    assert re.fullmatch(r"[0-9a-f]{32}", err["request_id"])
    [(_, sender, recipient, ts, text)] = stored(server, message_id)
    assert (sender, recipient, text) == ("+919876543210", "+14155550100", None)
    assert ts.endswith("Z")


@pytest.mark.slow
@pytest.mark.usefixtures("secret_env")
def test_send_reports_a_refusal_with_its_status_and_exit_code_1(
    server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["send", "--url", server.base_url, "--message-id", "send-bad", "--from", "12345"]
    assert main(argv) == EXIT_UNEXPECTED
    out = capsys.readouterr().out
    assert out.startswith("422 ")
    assert json.loads(out[4:])["detail"][0]["loc"] == ["body", "from"]

    monkeypatch.setenv("WEBHOOK_SECRET", "not-the-secret")
    assert main(["send", "--url", server.base_url, "--message-id", "send-forged"]) == 1
    captured = capsys.readouterr()
    assert captured.out == '401 {"detail":"invalid signature"}\n'
    assert "WEBHOOK_SECRET" in captured.err
    assert stored(server, "send-bad") == stored(server, "send-forged") == []


def test_send_to_a_closed_port_says_so_with_exit_code_3(
    capsys: pytest.CaptureFixture[str], secret_env: None
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["send", "--url", url]) == EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert f"cannot reach {url}/webhook: connection refused" in err
    assert "Traceback" not in err


def test_send_to_a_server_that_never_answers_times_out_with_exit_code_3(
    capsys: pytest.CaptureFixture[str], secret_env: None
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts the connection, never answers
        port = listener.getsockname()[1]
        argv = ["send", "--url", f"http://127.0.0.1:{port}", "--timeout", "0.3"]
        assert main(argv) == EXIT_UNREACHABLE
    assert "no answer in time" in capsys.readouterr().err


@pytest.mark.parametrize(
    "url", ["localhost:8000", "ftp://127.0.0.1:8000", "http://", "http://h:port", "http://h/?q=1"]
)
def test_send_refuses_an_unusable_url_with_exit_code_2(
    url: str, capsys: pytest.CaptureFixture[str], secret_env: None
) -> None:
    assert main(["send", "--url", url]) == EXIT_USAGE
    assert "--url" in capsys.readouterr().err


def test_send_and_demo_without_a_secret_exit_2_before_any_request(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", "")
    # The port is closed: a request would give exit code 3, not 2.
    url = f"http://127.0.0.1:{free_port()}"
    for command in ("send", "demo"):
        assert main([command, "--url", url]) == EXIT_USAGE
        assert "WEBHOOK_SECRET is not set" in capsys.readouterr().err


# demo


@pytest.mark.slow
@pytest.mark.usefixtures("secret_env")
def test_demo_sends_its_traffic_and_reports_the_stats(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--url", server.base_url]) == EXIT_OK
    out = capsys.readouterr().out
    posts = [line for line in out.splitlines() if line.startswith("  POST /webhook")]
    statuses = [int(re.search(r" (\d{3}) \{", line).group(1)) for line in posts]  # type: ignore[union-attr]
    assert statuses == [200, 200, 200, 200, 200, 401, 422]
    assert "<- expected" not in out
    assert '"total_messages"' in out
    assert "4 new" in out
    assert out.rstrip().endswith("Every request answered as expected.")
    # The four conversation messages are stored, and nothing else of the demo's.
    assert server.db_path is not None
    with sqlite3.connect(server.db_path) as conn:
        demo_rows = conn.execute(
            "SELECT message_id FROM messages WHERE message_id LIKE 'demo-%' ORDER BY message_id"
        ).fetchall()
    run_id = demo_rows[0][0].split("-")[1]
    assert demo_rows == [(f"demo-{run_id}-{index}",) for index in range(1, 5)]
    # The service's access lines agree: four created, then the redelivery a duplicate.
    entries = [json.loads(line) for line in server.log_lines()]
    ours = [
        (entry["message_id"], entry["result"])
        for entry in entries
        if str(entry.get("message_id")).startswith(f"demo-{run_id}-")
    ]
    assert ours[:5] == [
        *[(f"demo-{run_id}-{index}", "created") for index in range(1, 5)],
        (f"demo-{run_id}-1", "duplicate"),
    ]


@pytest.mark.slow
def test_demo_reads_stats_with_the_first_read_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = "first-read-token-0123456789,second-read-token-0123456789"
    with running_server(tmp_path, env={"READ_TOKENS": tokens}) as locked:
        monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
        monkeypatch.delenv("READ_TOKENS", raising=False)
        assert main(["demo", "--url", locked.base_url]) == EXIT_UNEXPECTED
        assert "requires a read token: export READ_TOKENS" in capsys.readouterr().out
        (tmp_path / "tokens").write_text(tokens + "\n")
        monkeypatch.setenv("READ_TOKENS_FILE", str(tmp_path / "tokens"))
        assert main(["demo", "--url", locked.base_url]) == EXIT_OK
        monkeypatch.delenv("READ_TOKENS_FILE")
        monkeypatch.setenv("READ_TOKENS", tokens)
        assert main(["demo", "--url", locked.base_url]) == EXIT_OK
        assert "Every request answered as expected." in capsys.readouterr().out


@pytest.mark.slow
def test_demo_with_the_wrong_secret_fails_and_says_why(
    server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", "not-the-secret")
    assert main(["demo", "--url", server.base_url]) == EXIT_UNEXPECTED
    out = capsys.readouterr().out
    assert "<- expected 200" in out
    assert "the WEBHOOK_SECRET here is not the one the service verifies with" in out
    assert "Some requests did not." in out


@pytest.mark.slow
def test_demo_runs_on_the_standard_library_alone(server: Server) -> None:
    # -S: no site-packages, so neither FastAPI nor uvicorn nor pydantic can be imported;
    # this is how `make demo` runs on a host without the virtualenv.
    result = run_cli(
        "demo",
        "--url",
        server.base_url,
        env={"WEBHOOK_SECRET": SECRET},
        python=(sys.executable, "-S"),
    )
    assert result.returncode == 0, result.stderr
    assert "Every request answered as expected." in result.stdout


def test_demo_against_a_closed_port_exits_3_without_a_traceback() -> None:
    result = run_cli(
        "demo", "--url", f"http://127.0.0.1:{free_port()}", env={"WEBHOOK_SECRET": SECRET}
    )
    assert result.returncode == EXIT_UNREACHABLE
    assert "connection refused" in result.stderr
    assert "Traceback" not in result.stderr
