"""The settings this receiver's senders depend on: secrets, the window, WhatsApp's pair."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError

from app.config import ConfigError, Settings, load_settings, standard_webhook_key
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
    assert settings(whatsapp_app_secret="s", whatsapp_verify_token="t").whatsapp_enabled


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
