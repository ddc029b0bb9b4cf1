"""The settings this receiver's senders depend on: secrets, the window, WhatsApp's pair."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from app.config import (
    ConfigError,
    Settings,
    load_database_settings,
    load_settings,
    standard_webhook_key,
)
from app.database_config import FILE_SETTINGS
from tests.support.clients import MakeClient, json_lines
from tests.support.servers import UVICORN, free_port, run_module

KEY = bytes(range(24))
ENCODED = base64.b64encode(KEY).decode()  # 32 digits, no padding needed


def settings(**values: Any) -> Settings:
    return Settings(webhook_secret=SecretStr("abc"), **values)


@pytest.mark.parametrize(
    ("secret", "key"),
    [
        ("plain-secret", b"plain-secret"),
        ("Grüße", "Grüße".encode()),
        ("whsec_" + ENCODED, KEY),
        ("whsec_" + base64.b64encode(b"ab").decode(), b"ab"),  # 'YWI=', padded
        ("whsec_" + base64.b64encode(b"ab").decode().rstrip("="), b"ab"),  # unpadded
        (
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            base64.b64decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        ),
    ],
)
def test_standard_webhook_keys(secret: str, key: bytes) -> None:
    assert standard_webhook_key(secret) == key


@pytest.mark.parametrize(
    "secret",
    [
        "whsec_",
        "whsec_===",
        "whsec_not base64",
        "whsec_" + ENCODED + "!",
        "whsec_" + ENCODED.replace("A", "-", 1),  # url-safe alphabet
        "whsec_YWI==",  # too much padding
        "whsec_YWJ",  # a last digit with stray bits ('YWI' is canonical)
        "whsec_A",
    ],
)
def test_malformed_whsec_secrets_are_refused(secret: str) -> None:
    with pytest.raises(ValueError, match="whsec_"):
        standard_webhook_key(secret)
    with pytest.raises(ValidationError):
        Settings(webhook_secret=SecretStr(secret))
    with pytest.raises(ValidationError):
        settings(webhook_secret_previous=SecretStr(secret))


def test_keys_are_current_first() -> None:
    both = settings(webhook_secret_previous=SecretStr("whsec_" + ENCODED))
    assert both.secrets() == (b"abc", ("whsec_" + ENCODED).encode())
    assert both.standard_webhook_keys() == (b"abc", KEY)
    assert settings().standard_webhook_keys() == (b"abc",)


def test_empty_optional_secrets_are_unset_and_blank_ones_refused() -> None:
    empty = settings(webhook_secret_previous="", whatsapp_app_secret="", whatsapp_verify_token="")
    assert empty.webhook_secret_previous is None
    assert not empty.whatsapp_enabled
    for name in ["webhook_secret_previous", "whatsapp_app_secret", "whatsapp_verify_token"]:
        with pytest.raises(ValidationError, match="non-empty"):
            settings(**{name: "   "})


def test_whatsapp_needs_both_settings() -> None:
    assert not settings().whatsapp_enabled
    assert not settings(whatsapp_app_secret="s").whatsapp_enabled
    assert not settings(whatsapp_verify_token="t").whatsapp_enabled
    both = settings(whatsapp_app_secret="s", whatsapp_verify_token="t", allow_open_reads=True)
    assert both.whatsapp_enabled


def test_defaults_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = settings()
    assert defaults.webhook_tolerance_past_seconds == 300
    assert defaults.webhook_tolerance_future_seconds == 300
    assert defaults.whatsapp_max_body_bytes == 3 * 1024 * 1024
    monkeypatch.setenv("WEBHOOK_SECRET", "abc")
    monkeypatch.setenv("WEBHOOK_TOLERANCE_FUTURE_SECONDS", "0")
    with pytest.raises(ConfigError, match="WEBHOOK_TOLERANCE_FUTURE_SECONDS"):
        load_settings()


def test_secrets_stay_out_of_repr() -> None:
    shown = repr(
        settings(
            webhook_secret_previous="old-hunter2",
            whatsapp_app_secret="app-hunter2",
            whatsapp_verify_token="token-hunter2",
            read_tokens="read-hunter2-0123456789",
            metrics_token="metrics-hunter2-0123456789",
            database_url="postgresql://user:hunter2@db:5432/app",
        )
    )
    assert "hunter2" not in shown


@pytest.mark.slow
def test_a_malformed_whsec_secret_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    env = {"WEBHOOK_SECRET": "whsec_s3cr3t!value", "DATABASE_URL": f"sqlite:///{tmp_path}/a.db"}
    result = run_module(env, *UVICORN, str(free_port()))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "WEBHOOK_SECRET" in lines[0]
    assert "whsec_" in lines[0]
    assert "s3cr3t" not in result.stderr + result.stdout


# Weak secrets: refused when unusable, warned about when merely short


@pytest.mark.parametrize(
    ("value", "said", "hidden"),
    [
        (" s3cr3t ", "whitespace", "s3cr3t"),
        ("s3cr3t\n", "whitespace", "s3cr3t"),
        ("\ts3cr3t", "whitespace", "s3cr3t"),
        ("whsec_AA==", "at least 24 bytes", "AA=="),  # one zero byte
        ("whsec_" + base64.b64encode(b"s3cr3t" * 3).decode(), "at least 24 bytes", "czNjcjN0"),
    ],
)
def test_unusable_secrets_are_refused(
    monkeypatch: pytest.MonkeyPatch, value: str, said: str, hidden: str
) -> None:
    for name in ["WEBHOOK_SECRET", "WEBHOOK_SECRET_PREVIOUS"]:
        monkeypatch.setenv("WEBHOOK_SECRET", "a-good-enough-secret")
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match=said) as caught:
            load_settings()
        assert f"{name}: " in str(caught.value)
        assert hidden not in str(caught.value)
        monkeypatch.delenv("WEBHOOK_SECRET_PREVIOUS", raising=False)


def test_a_whsec_key_of_24_bytes_is_the_minimum() -> None:
    key = "whsec_" + base64.b64encode(bytes(range(24))).decode()
    assert Settings(webhook_secret=key).standard_webhook_keys() == (bytes(range(24)),)


def test_whatsapp_secrets_must_not_be_padded() -> None:
    for name in ["whatsapp_app_secret", "whatsapp_verify_token"]:
        with pytest.raises(ValidationError, match="whitespace"):
            settings(**{name: " token-with-a-space-in-front"})


@pytest.mark.parametrize(
    ("values", "warned"),
    [
        ({"webhook_secret": "a"}, ["WEBHOOK_SECRET"]),
        ({"webhook_secret": "testsecret"}, ["WEBHOOK_SECRET"]),
        ({"webhook_secret": "x" * 31}, ["WEBHOOK_SECRET"]),
        ({"webhook_secret": "x" * 32}, []),
        ({"webhook_secret": "é" * 16}, []),  # 32 bytes
        ({"webhook_secret": "whsec_" + ENCODED}, []),  # 24 random bytes, by construction
        (
            {"webhook_secret": "x" * 32, "webhook_secret_previous": "old"},
            ["WEBHOOK_SECRET_PREVIOUS"],
        ),
        (
            {
                "webhook_secret": "x" * 32,
                "whatsapp_app_secret": "short",
                "whatsapp_verify_token": "t",
                "allow_open_reads": True,
            },
            ["WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN"],
        ),
        (
            {
                "webhook_secret": "x" * 32,
                "whatsapp_app_secret": "0123456789abcdef0123456789abcdef",
                "whatsapp_verify_token": "sixteen-chars-ok",
                "allow_open_reads": True,
            },
            [],
        ),
    ],
)
def test_short_secrets_are_named_in_a_warning(values: dict[str, Any], warned: list[str]) -> None:
    weak = Settings(**values).weak_secrets()
    assert [variable for variable, _ in weak] == warned


def test_the_warnings_are_logged_once_at_start_up(
    capsys: pytest.CaptureFixture[str], make_client: MakeClient
) -> None:
    make_client(webhook_secret=SecretStr("testsecret"))
    lines = json_lines(capsys.readouterr().out)
    named = [line for line in lines if line.get("setting") == "WEBHOOK_SECRET"]
    assert len(named) == 1
    assert named[0]["level"] == "WARNING"
    assert "32 bytes" in named[0]["msg"]
    assert "testsecret" not in json.dumps(lines)


# Tokens


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("short", "at least 16 characters"),
        ("a" * 16 + ",", "empty entry"),
        ("a" * 16 + ",," + "b" * 16, "empty entry"),
        ("a" * 16 + ", " + "b" * 16, "whitespace"),
        (" " + "a" * 16, "whitespace"),
        ("a" * 8 + " " + "a" * 8, "whitespace"),
        ("a" * 16 + '"', "letters, digits"),
        ("é" * 16, "letters, digits"),
        ("=" + "a" * 16, "letters, digits"),
    ],
)
def test_malformed_tokens_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, said: str
) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", "abc")
    for name in ["READ_TOKENS", "METRICS_TOKEN"]:
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match=said) as caught:
            load_settings()
        assert str(caught.value).startswith(f"invalid configuration: {name}: ")
        monkeypatch.delenv(name)


def test_tokens_in_base64_or_hex_are_accepted() -> None:
    tokens = "0123456789abcdef0123456789abcdef,AbC+/9_-.~xyz0123456==,zzzzzzzzzzzzzzzz"
    assert len(settings(read_tokens=tokens).read_token_list()) == 3


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("example.com:8000", "without a port"),
        ("[::1]:8000", "without a port"),
        ("*,localhost", "stand alone"),
        ("localhost,,example.com", "empty entry"),
        ("exa mple.com", "not a host name"),
        ("http://example.com", "not a host name"),
    ],
)
def test_malformed_allowed_hosts_are_refused(value: str, said: str) -> None:
    with pytest.raises(ValidationError, match=said):
        settings(allowed_hosts=value)


# NAME_FILE


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in [*FILE_SETTINGS]:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(f"{name.upper()}_FILE", raising=False)
    return monkeypatch


def test_every_secret_setting_reads_from_a_file(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    values = {
        "WEBHOOK_SECRET": "secret-from-a-file-0123456789abcdef",
        "WEBHOOK_SECRET_PREVIOUS": "whsec_" + ENCODED,
        "WHATSAPP_APP_SECRET": "0123456789abcdef0123456789abcdef",
        "WHATSAPP_VERIFY_TOKEN": "verify-token-0123456789",
        "READ_TOKENS": "read-token-0123456789,next-token-0123456789",
        "METRICS_TOKEN": "metrics-token-0123456789",
        "ADMIN_TOKENS": "alice:admin-token-0123456789",
        "DATABASE_URL": "postgresql://app:p%40ss@db:5432/app",
        "DATABASE_DIRECT_URL": "postgresql://app:p%40ss@db-primary:5432/app",
    }
    for name, value in values.items():
        path = tmp_path / name.lower()
        path.write_text(value + "\n")  # as `echo` or an editor leaves it
        clean_env.setenv(f"{name}_FILE", str(path))
    loaded = load_settings()
    assert {name.lower() for name in values} == FILE_SETTINGS
    for name, value in values.items():
        read = getattr(loaded, name.lower())
        assert (read if isinstance(read, str) else read.get_secret_value()) == value


@pytest.mark.parametrize(
    ("content", "outcome"),
    [
        ("abcdef", "abcdef"),
        ("abcdef\n", "abcdef"),
        ("abcdef\r\n", "abcdef"),
        ("abcdef\n\n", "whitespace"),
        ("abcdef \n", "whitespace"),
        ("\n", "non-empty"),
        ("", "non-empty"),
    ],
)
def test_one_trailing_newline_is_dropped_and_nothing_else(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, content: str, outcome: str
) -> None:
    path = tmp_path / "secret"
    path.write_bytes(content.encode())
    clean_env.setenv("WEBHOOK_SECRET_FILE", str(path))
    if outcome.startswith("abc"):
        assert load_settings().webhook_secret.get_secret_value() == outcome
    else:
        with pytest.raises(ConfigError, match=outcome):
            load_settings()


def test_a_value_and_a_file_for_one_setting_are_refused(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "secret").write_text("from-the-file")
    clean_env.setenv("WEBHOOK_SECRET_FILE", str(tmp_path / "secret"))
    clean_env.setenv("WEBHOOK_SECRET", "from-the-environment")
    with pytest.raises(ConfigError, match="WEBHOOK_SECRET and WEBHOOK_SECRET_FILE are both set"):
        load_settings()
    # Compose passes an unset variable as "": that is not a second value.
    clean_env.setenv("WEBHOOK_SECRET", "")
    assert load_settings().webhook_secret.get_secret_value() == "from-the-file"


@pytest.mark.parametrize(
    ("make_path", "said"),
    [
        (lambda tmp: tmp / "missing", "cannot read"),
        (lambda tmp: tmp, "cannot read"),  # a directory
        (lambda tmp: tmp / "big", "over 65536 bytes"),
        (lambda tmp: tmp / "binary", "not UTF-8"),
    ],
)
def test_an_unusable_file_is_refused_naming_the_variable(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, make_path: Any, said: str
) -> None:
    (tmp_path / "big").write_text("s3cr3t" * 20000)
    (tmp_path / "binary").write_bytes(b"s3cr3t\xff\xfe")
    clean_env.setenv("WEBHOOK_SECRET", "abc")
    clean_env.setenv("READ_TOKENS_FILE", str(make_path(tmp_path)))
    with pytest.raises(ConfigError, match=said) as caught:
        load_settings()
    assert "READ_TOKENS_FILE" in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


def test_init_db_reads_database_url_from_a_file_too(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "url").write_text(f"sqlite:///{tmp_path}/from-file.db\n")
    clean_env.setenv("DATABASE_URL_FILE", str(tmp_path / "url"))
    assert load_database_settings().database.target == f"{tmp_path}/from-file.db"
