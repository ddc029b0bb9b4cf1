"""The lifecycle's settings: RETENTION_DAYS, TOMBSTONE_DAYS, RETENTION_INTERVAL_SECONDS and
ADMIN_TOKENS, read from the environment, refused with one line that quotes no token."""

from __future__ import annotations

import pytest

from app.config import ConfigError, load_settings
from app.setting_values import parse_admin_tokens

TOKEN = "0123456789abcdef-secret"


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", "abc")
    for name in ["RETENTION_DAYS", "TOMBSTONE_DAYS", "RETENTION_INTERVAL_SECONDS", "ADMIN_TOKENS"]:
        monkeypatch.delenv(name, raising=False)


def test_defaults_keep_everything_and_erase_nothing() -> None:
    settings = load_settings()
    assert settings.retention_days is None
    assert settings.tombstone_days == 30
    assert settings.retention_interval_seconds == 10
    assert settings.admin_credentials() == ()


def test_empty_values_mean_unset_as_compose_passes_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["RETENTION_DAYS", "TOMBSTONE_DAYS", "RETENTION_INTERVAL_SECONDS", "ADMIN_TOKENS"]:
        monkeypatch.setenv(name, "")
    settings = load_settings()
    assert (settings.retention_days, settings.tombstone_days) == (None, 30)
    assert settings.admin_credentials() == ()


def test_values_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETENTION_DAYS", "0.5")
    monkeypatch.setenv("TOMBSTONE_DAYS", "0")
    monkeypatch.setenv("ADMIN_TOKENS", f"alice:{TOKEN},ci.bot-1:{TOKEN}x")
    settings = load_settings()
    assert (settings.retention_days, settings.tombstone_days) == (0.5, 0)
    assert settings.admin_credentials() == (("alice", TOKEN), ("ci.bot-1", TOKEN + "x"))
    assert TOKEN not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("RETENTION_DAYS", "0", "RETENTION_DAYS"),
        ("RETENTION_DAYS", "-1", "RETENTION_DAYS"),
        ("RETENTION_DAYS", "a week", "RETENTION_DAYS"),
        ("TOMBSTONE_DAYS", "-1", "TOMBSTONE_DAYS"),
        ("RETENTION_INTERVAL_SECONDS", "0", "RETENTION_INTERVAL_SECONDS"),
        ("ADMIN_TOKENS", TOKEN, "name:token"),
        ("ADMIN_TOKENS", f":{TOKEN}", "a name may hold"),
        ("ADMIN_TOKENS", f"alice:{TOKEN}, bob:{TOKEN}", "a name may hold"),
        ("ADMIN_TOKENS", f"alice:{TOKEN},alice:{TOKEN}y", "appears twice"),
        ("ADMIN_TOKENS", "alice:short", "at least 16 characters"),
        ("ADMIN_TOKENS", f"alice:{TOKEN} ", "may hold letters"),
        ("ADMIN_TOKENS", f"alice:{TOKEN},", "name:token"),
    ],
)
def test_a_bad_value_is_one_line_that_names_it_and_quotes_no_token(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, says: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert name in message
    assert says in message
    assert "\n" not in message
    assert TOKEN not in message
    assert "short" not in message


def test_tokens_are_parsed_in_order() -> None:
    assert parse_admin_tokens(f"a:{TOKEN},b:{TOKEN}==") == (("a", TOKEN), ("b", TOKEN + "=="))
