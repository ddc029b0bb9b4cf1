"""The lifecycle's endpoints under the access rule: reads take a read token once
READ_TOKENS is set, erasure takes an admin token and nothing else (app/access.py)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from app.access import ADMIN_METHOD, ADMIN_PREFIXES
from app.api.admin import require_admin
from app.config import load_settings
from app.main import create_app
from tests.support.clients import AppClient, MakeClient, make_settings, message
from tests.support.lifecycle import ADMIN_HEADERS, ADMIN_TOKEN, ADMIN_TOKENS

READ = "read-token-0123456789abcdef"
CAROL = "+447700900123"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def locked(make_client: MakeClient, **settings: Any) -> AppClient:
    client = make_client(read_tokens=READ, **settings)
    client.read_token = READ
    client.post_signed(message(message_id="m1"))
    client.post_signed(message(message_id="m2", to=CAROL))
    return client


@pytest.mark.parametrize("path", ["/messages/m1", "/messages/export", "/messages/nope"])
def test_reads_take_a_read_token(make_client: MakeClient, path: str) -> None:
    client = locked(make_client)
    refused = client.get(path)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    # An admin token is not a read token.
    assert client.get(path, headers=ADMIN_HEADERS).status_code == 401
    assert client.get(path, headers=bearer(READ)).status_code in (200, 404)


def test_erasure_takes_an_admin_token_and_no_read_token(make_client: MakeClient) -> None:
    client = locked(make_client, admin_tokens=ADMIN_TOKENS)
    for headers in ({}, bearer(READ)):
        for path in ["/messages/m1", f"/numbers/{CAROL}"]:
            response = client.delete(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json() == {"detail": "missing or invalid admin token"}
    assert client.delete("/messages/m1", headers=ADMIN_HEADERS).json() == {
        "deleted": 1,
        "tombstones": 1,
    }
    assert client.delete(f"/numbers/{CAROL}", headers=ADMIN_HEADERS).json()["deleted"] == 1
    assert client.rows() == []


def test_without_admin_tokens_erasure_is_a_path_that_does_not_exist(
    make_client: MakeClient,
) -> None:
    client = locked(make_client)
    # Like any unknown path under READ_TOKENS: 401 without a read token, 404 with one.
    for path in ["/messages/m1", f"/numbers/{CAROL}"]:
        assert client.delete(path, headers=ADMIN_HEADERS).status_code == 401
        assert client.delete(path, headers=bearer(READ)).status_code == 404
    assert len(client.rows()) == 2


def every_route(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    for route in routes:
        # FastAPI keeps an included router whole: its routes are the original router's.
        inner = getattr(route, "original_router", None)
        if inner is None:
            yield route
        else:
            yield from every_route(inner.routes)


def test_every_delete_route_the_guard_lets_through_checks_the_admin_token() -> None:
    app = create_app(make_settings(admin_tokens=ADMIN_TOKENS))
    guarded = [
        route
        for route in every_route(app.routes)
        if isinstance(route, APIRoute)
        and ADMIN_METHOD in (route.methods or ())
        and route.path.startswith(ADMIN_PREFIXES)
    ]
    assert {route.path for route in guarded} == {"/messages/{message_id:path}", "/numbers/{e164}"}
    for route in guarded:
        calls = [dependency.call for dependency in route.dependant.dependencies]
        assert require_admin in calls, route.path


def test_admin_tokens_may_come_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "admin_tokens"
    secret.write_text(ADMIN_TOKENS + "\n", encoding="utf-8")
    monkeypatch.setenv("WEBHOOK_SECRET", "abc")
    monkeypatch.delenv("ADMIN_TOKENS", raising=False)
    monkeypatch.setenv("ADMIN_TOKENS_FILE", str(secret))
    assert load_settings().admin_credentials()[0] == ("alice", ADMIN_TOKEN)
