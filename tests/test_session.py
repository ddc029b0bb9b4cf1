"""The console's session cookie (app/session.py): what it accepts and what it refuses."""

from __future__ import annotations

import time

import pytest

from app.session import COOKIE, SessionCookies, cookie_value, cookie_values, token_matches
from tests.support.clients import AppClient, MakeClient

TOKEN = "a-read-token-of-some-length-0001"
OTHER = "another-read-token-of-length-02"
NOW = 1_750_000_000.0


def header(value: str) -> list[tuple[bytes, bytes]]:
    return [(b"cookie", f"theme=dark; {COOKIE}={value}; other=1".encode())]


def test_a_fresh_cookie_is_valid_until_it_expires() -> None:
    value = cookie_value(TOKEN, NOW, ttl=3600)
    cookies = SessionCookies([OTHER, TOKEN])
    assert cookies.check_at(header(value), NOW) is True
    assert cookies.check_at(header(value), NOW + 3599) is True
    assert cookies.check_at(header(value), NOW + 3600) is False


def test_removing_its_token_ends_a_session() -> None:
    value = cookie_value(TOKEN, NOW, ttl=3600)
    assert SessionCookies([OTHER]).check_at(header(value), NOW) is False
    assert not SessionCookies([])


@pytest.mark.parametrize(
    "tamper",
    [
        lambda v: str(int(v.split(".")[0]) + 3600) + "." + v.split(".")[1],  # a later expiry
        lambda v: v[:-1] + ("A" if v[-1] != "A" else "B"),  # another signature
        lambda v: v.split(".")[0],  # no signature
        lambda v: "0." + v.split(".")[1],
        lambda v: v + "=",
        lambda v: " " + v,
        lambda v: "",
    ],
)
def test_a_tampered_cookie_is_refused(tamper: object) -> None:
    value = cookie_value(TOKEN, NOW, ttl=3600)
    forged = tamper(value)  # type: ignore[operator]
    assert SessionCookies([TOKEN]).check_at(header(forged), NOW) is False


def test_no_cookie_is_no_credential() -> None:
    cookies = SessionCookies([TOKEN])
    assert cookies.check_at([], NOW) is None
    assert cookies.check_at([(b"cookie", b"theme=dark")], NOW) is None
    assert cookies.check_at([(b"authorization", b"Bearer x")], NOW) is None


def test_cookie_values_are_found_in_every_cookie_header() -> None:
    headers = [(b"cookie", b"a=1"), (b"cookie", f"{COOKIE}=x; {COOKIE}x=y".encode())]
    assert cookie_values(headers) == [b"x"]


def test_token_matches_only_a_configured_token() -> None:
    assert token_matches(TOKEN, [OTHER, TOKEN])
    assert not token_matches(TOKEN[:-1], [OTHER, TOKEN])
    assert not token_matches("", [TOKEN])
    assert not token_matches(TOKEN, [])


# The routes


@pytest.fixture
def locked(make_client: MakeClient) -> AppClient:
    return make_client(read_tokens=f"{OTHER},{TOKEN}", session_ttl_seconds=600)


def test_signing_in_sets_a_signed_expiring_http_only_strict_cookie(locked: AppClient) -> None:
    assert locked.get("/session").json() == {"required": True, "signed_in": False}
    response = locked.post("/session", json={"token": TOKEN})
    assert response.status_code == 204
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    for attribute in ("HttpOnly", "Max-Age=600", "Path=/", "SameSite=strict"):
        assert attribute in cookie
    assert "Secure" not in cookie  # plain HTTP here; over HTTPS it is Secure
    value = cookie.split(";")[0].split("=", 1)[1]
    assert SessionCookies([TOKEN]).check_at(header(value), time.time()) is True
    assert locked.get("/session").json() == {"required": True, "signed_in": True}


def test_a_form_works_as_well_as_json(locked: AppClient) -> None:
    response = locked.post("/session", data={"token": OTHER})
    assert response.status_code == 204


@pytest.mark.parametrize(
    "body",
    [
        {"token": TOKEN[:-1]},
        {"token": ""},
        {"token": 1},
        {"other": TOKEN},
        [TOKEN],
    ],
)
def test_a_wrong_token_is_401_and_sets_nothing(locked: AppClient, body: object) -> None:
    response = locked.post("/session", json=body)
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert TOKEN not in response.text


def test_signing_out_clears_the_cookie(locked: AppClient) -> None:
    locked.post("/session", json={"token": TOKEN})
    response = locked.delete("/session")
    assert response.status_code == 204
    assert f'{COOKIE}=""' in response.headers["set-cookie"]
    assert "Max-Age=0" in response.headers["set-cookie"]
    assert locked.get("/session").json()["signed_in"] is False


def test_without_read_tokens_there_is_nothing_to_sign_in_to(client: AppClient) -> None:
    assert client.get("/session").json() == {"required": False, "signed_in": False}
    assert client.post("/session", json={"token": TOKEN}).status_code == 404
