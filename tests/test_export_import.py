"""Export (GET /messages/export, `python -m app export`) and import (`python -m app import`):
same filters as /messages, streamed in pages; an import into an empty store reproduces the
same /stats, pages and messages, received_at included; idempotent; erased ids refused."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from app.cli import main
from app.storage import StorageUnavailable
from app.storage.lifecycle import ImportCounts, parse_import_line
from app.storage.postgres import lifecycle as postgres_lifecycle
from app.storage.sqlite import lifecycle as sqlite_lifecycle
from tests.support.clients import AppClient, MakeClient, json_lines, message
from tests.support.lifecycle import (
    ADMIN_HEADERS,
    SENDERS,
    all_pages,
    assert_exact,
    corpus,
    export_lines,
    lifecycle_settings,
    post_all,
)
from tests.support.postgres import PostgresCluster
from tests.support.servers import ROOT

FIELDS = ["message_id", "from", "to", "ts", "text", "received_at"]


@pytest.fixture(autouse=True)
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many pages from a small corpus: the paging is what is under test.
    monkeypatch.setattr(sqlite_lifecycle, "EXPORT_PAGE", 7)
    monkeypatch.setattr(postgres_lifecycle, "EXPORT_PAGE", 7)


@pytest.fixture
def source(make_client: MakeClient, database_url: str) -> AppClient:
    client = make_client(lifecycle_settings(database_url))
    post_all(client, corpus(150))
    post_all(client, [message(message_id="odd/id", text=None), message(message_id="export")])
    return client


def import_lines(client: AppClient, lines: list[str], batch: int = 40) -> ImportCounts:
    counts = ImportCounts()
    rows = [parse_import_line(line.encode()) for line in lines]
    assert client.portal is not None
    for start in range(0, len(rows), batch):
        counts.add(
            client.portal.call(client.store.lifecycle.import_rows, rows[start : start + batch])
        )
    return counts


def test_export_is_every_message_in_listing_order_with_received_at(source: AppClient) -> None:
    response = source.get("/messages/export")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.headers["content-disposition"].startswith('attachment; filename="messages-')
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["message_id"] for line in lines] == all_pages(source)[0]
    stored = {
        row[0]: row
        for row in source.rows(
            "SELECT message_id, from_msisdn, to_msisdn, ts, text, created_at FROM messages"
        )
    }
    for line in lines:
        assert list(line) == FIELDS
        assert tuple(line.values()) == stored[line["message_id"]]


@pytest.mark.parametrize(
    "params",
    [
        {"from": SENDERS[0]},
        {"from": " " + SENDERS[1][1:]},
        {"since": "2029-12-02T06:00:00Z"},
        {"q": "hello"},
        {"q": "STRASSE", "from": SENDERS[2]},
        {"q": "%"},
        {"q": "", "since": "2029-12-01T00:00:00.5Z"},
        {"to": SENDERS[1]},
        {"until": "2029-12-01T12:00:00Z", "to": SENDERS[0]},
        {"since": "2029-11-30T00:00:00Z", "until": "2029-12-01T00:00:00Z", "q": "ok"},
    ],
)
def test_export_takes_the_filters_of_messages(source: AppClient, params: dict[str, str]) -> None:
    exported = [line["message_id"] for line in export_lines(source, **params)]
    assert exported == all_pages(source, **params)[0]


@pytest.mark.parametrize(
    "params", [{"from": "12345"}, {"since": "2025-02-30T00:00:00Z"}, {"q": "x" * 300}]
)
def test_export_refuses_bad_filters_as_messages_does(
    source: AppClient, params: dict[str, str]
) -> None:
    assert source.get("/messages/export", params=params).status_code == 422


def test_export_of_an_empty_store_is_empty(client: AppClient) -> None:
    response = client.get("/messages/export")
    assert (response.status_code, response.text) == (200, "")


def test_export_then_import_into_an_empty_store_reproduces_it(
    source: AppClient, make_client: MakeClient, database_url: str, postgres_or_none: Any
) -> None:
    lines = source.get("/messages/export").text.splitlines()
    target_url = (
        "sqlite:///:memory:" if postgres_or_none is None else postgres_or_none.create_database()
    )
    target = make_client(lifecycle_settings(target_url))
    counts = import_lines(target, lines)
    assert counts == ImportCounts(created=len(lines))
    assert target.get("/stats").json() == source.get("/stats").json()
    for params in [{}, {"q": "hello"}, {"from": SENDERS[3]}, {"since": "2029-12-02T00:00:00Z"}]:
        for offset in (0, 50, 100):
            query = {"limit": 50, "offset": offset, **params}
            assert (
                target.get("/messages", params=query).json()
                == source.get("/messages", params=query).json()
            )
    for message_id in ["m00000", "m00077", "odd/id"]:
        assert (
            target.get(f"/messages/{message_id}").json()
            == source.get(f"/messages/{message_id}").json()
        )
    assert target.get("/messages/export").text == source.get("/messages/export").text
    assert_exact(target)

    # Again: nothing new. An erased id is refused, not stored back.
    assert import_lines(target, lines) == ImportCounts(duplicate=len(lines))
    assert target.delete("/messages/m00010", headers=ADMIN_HEADERS).status_code == 200
    assert import_lines(target, lines) == ImportCounts(duplicate=len(lines) - 1, tombstoned=1)
    assert target.get("/messages/m00010").status_code == 404


@pytest.fixture
def postgres_or_none(request: pytest.FixtureRequest, database_url: str) -> PostgresCluster | None:
    if database_url.startswith("sqlite"):
        return None
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster


class FailingExport:
    """The store's lifecycle, with an export that fails after `pages` pages."""

    def __init__(self, inner: Any, pages: int) -> None:
        self.inner = inner
        self.pages = pages

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def export(self, query: Any) -> Any:
        served = 0
        async for page in self.inner.export(query):
            if served == self.pages:
                raise StorageUnavailable("database is locked")
            served += 1
            yield page


def test_an_export_that_cannot_start_is_a_503(source: AppClient) -> None:
    source.store.lifecycle = FailingExport(source.store.lifecycle, 0)  # type: ignore[assignment]
    response = source.get("/messages/export")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"


def test_an_export_that_fails_midway_stops_and_says_so(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient
) -> None:
    client = make_client(lifecycle_settings("sqlite:///:memory:"))
    post_all(client, corpus(40))
    client.store.lifecycle = FailingExport(client.store.lifecycle, 2)  # type: ignore[assignment]
    capsys.readouterr()
    # The status is out, so the body stops short; the server then closes the connection
    # without the final chunk (uvicorn: "ASGI callable returned without completing
    # response"), so a client cannot take the part for the whole.
    response = client.get("/messages/export")
    assert len(response.text.splitlines()) == 14
    lines = json_lines(capsys.readouterr().out)
    assert [line["msg"] for line in lines if line["level"] != "INFO"][:1] == ["export interrupted"]


# The command line, in this process (DATABASE_URL from the environment).


@pytest.fixture
def sqlite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cli.db"
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{path}")
    monkeypatch.delenv("WEBHOOK_SECRET", raising=False)
    return path


def ndjson(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "in.ndjson"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def lines_of(messages: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(body) for body in messages]


def stored_ids(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT message_id FROM messages ORDER BY 1")]


def test_import_stops_at_the_first_invalid_line_with_its_number(
    sqlite_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = lines_of(corpus(30))
    bad = json.dumps({"message_id": "bad", "from": "+919876543210", "to": "1", "ts": "x"})
    path = ndjson(tmp_path, [*good[:12], "", bad, *good[12:]])
    assert main(["import", str(path)]) == 1
    out = capsys.readouterr()
    assert "line 14: to: " in out.err
    assert "ts: " in out.err
    assert "import stopped at line 14" in out.err
    assert out.out.strip() == (
        "read 13 lines: 12 created, 0 already stored, 0 refused (erased or purged), 1 invalid"
    )
    assert stored_ids(sqlite_file) == sorted(json.loads(line)["message_id"] for line in good[:12])

    # Fixed and run again: the first twelve are already there, the rest arrive.
    path = ndjson(tmp_path, good)
    assert main(["import", str(path)]) == 0
    assert capsys.readouterr().out.strip() == (
        "read 30 lines: 18 created, 12 already stored, 0 refused (erased or purged), 0 invalid"
    )
    assert len(stored_ids(sqlite_file)) == 30


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not json", "line: Invalid JSON"),
        ("[1, 2]", "line: Input should be"),
        (
            '{"message_id": "x", "from": "+12345", "to": "+12345", "ts": "2025-01-01T00:00:00"}',
            "ts: ",
        ),
        (
            '{"message_id": "x", "from": "+12345", "to": "+12345", "ts": "2025-01-01T00:00:00Z",'
            ' "received_at": 5}',
            "received_at: must be a string",
        ),
        (
            '{"message_id": "x", "from": "+12345", "to": "+12345", "ts": "2025-01-01T00:00:00Z",'
            ' "received_at": "2025-01-01 00:00:00"}',
            "received_at: must be an ISO-8601",
        ),
        (
            '{"message_id": "", "from": "+12345", "to": "+12345", "ts": "2025-01-01T00:00:00Z"}',
            "message_id: ",
        ),
    ],
)
def test_an_invalid_line_says_what_is_wrong(
    sqlite_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, problem: str
) -> None:
    assert main(["import", "--skip-invalid", str(ndjson(tmp_path, [line]))]) == 1
    err = capsys.readouterr().err
    assert f"line 1: {problem}" in err


def test_skip_invalid_imports_every_valid_line(
    sqlite_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = lines_of(corpus(10))
    path = ndjson(tmp_path, [good[0], "{}", *good[1:], "nope", '{"x": 1, "position": 3}'])
    assert main(["import", "--skip-invalid", str(path)]) == 1
    out = capsys.readouterr()
    assert [line.split(":")[0] for line in out.err.splitlines()] == ["line 2", "line 12", "line 13"]
    assert "10 created" in out.out
    assert "3 invalid" in out.out
    assert len(stored_ids(sqlite_file)) == 10


def test_import_keeps_received_at_and_ignores_other_fields(
    sqlite_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {**message(message_id="kept"), "received_at": "2024-02-29T12:00:00.123456789Z"}
    body["position"] = 17
    assert main(["import", str(ndjson(tmp_path, [json.dumps(body)]))]) == 0
    with sqlite3.connect(sqlite_file) as conn:
        assert conn.execute("SELECT created_at FROM messages").fetchall() == [
            ("2024-02-29T12:00:00.123456Z",)
        ]


def test_cli_export_writes_ndjson_to_stdout(
    sqlite_file: Path, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    messages = corpus(25)
    assert main(["import", str(ndjson(tmp_path, lines_of(messages)))]) == 0
    capsysbinary.readouterr()
    assert main(["export", "--from", SENDERS[0]]) == 0
    out = capsysbinary.readouterr()
    lines = [json.loads(line) for line in out.out.decode().splitlines()]
    expected = sorted(
        (m for m in messages if m["from"] == SENDERS[0]), key=lambda m: m["message_id"]
    )
    assert sorted(line["message_id"] for line in lines) == [m["message_id"] for m in expected]
    assert out.err.decode().strip() == f"exported {len(expected)} messages"


def test_cli_commands_refuse_what_they_cannot_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'absent.db'}")
    assert main(["export"]) == 1
    assert "no database at" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "absent.ndjson")]) == 2
    assert "cannot read" in capsys.readouterr().err
    monkeypatch.setenv("DATABASE_URL", "sqlite:///:memory:")
    assert main(["import", str(ndjson(tmp_path, []))]) == 2
    assert main(["export", "--since", "yesterday"]) == 2
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:p@127.0.0.1:1/db")
    assert main(["backup", str(tmp_path / "b.db")]) == 2
    assert "pg_dump" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.postgres
def test_moving_a_sqlite_store_to_postgresql_takes_two_commands(
    tmp_path: Path, postgres: PostgresCluster, make_client: MakeClient
) -> None:
    # Exactly the commands docs/lifecycle.md gives, as separate processes.
    sqlite_url = f"sqlite:///{tmp_path / 'app.db'}"
    source = make_client(lifecycle_settings(sqlite_url))
    post_all(source, corpus(300))
    target_url = postgres.create_database("moved")
    dump = tmp_path / "all.ndjson"
    with dump.open("wb") as out:
        subprocess.run(
            [sys.executable, "-m", "app", "export"],
            env=_env(sqlite_url),
            cwd=ROOT,
            stdout=out,
            check=True,
            timeout=60,
        )
    result = subprocess.run(
        [sys.executable, "-m", "app", "import", str(dump)],
        env=_env(target_url),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.startswith("read 300 lines: 300 created")
    target = make_client(lifecycle_settings(target_url))
    assert target.get("/stats").json() == source.get("/stats").json()
    assert all_pages(target) == all_pages(source)
    assert target.get("/messages/export").text == source.get("/messages/export").text


def _env(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WEBHOOK_SECRET", "DATABASE_URL")}
    return {**env, "DATABASE_URL": database_url}
