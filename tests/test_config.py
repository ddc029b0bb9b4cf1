"""Configuration from the environment (SPEC section 1)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from app.config import ConfigError, Settings, load_settings
from app.database_config import parse_database_url
from tests.support.servers import UVICORN, free_port, run_module


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "WEBHOOK_SECRET"),
        ({"WEBHOOK_SECRET": ""}, "WEBHOOK_SECRET"),
        ({"WEBHOOK_SECRET": "   "}, "WEBHOOK_SECRET"),
        ({"WEBHOOK_SECRET": "s3cr3t-value", "DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
        ({"WEBHOOK_SECRET": "s3cr3t-value", "LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
        ({"WEBHOOK_SECRET": "s3cr3t-value", "MAX_BODY_BYTES": "lots"}, "MAX_BODY_BYTES"),
        ({"WEBHOOK_SECRET": "s3cr3t-value", "DATABASE_POOL_SIZE": "0"}, "DATABASE_POOL_SIZE"),
    ],
)
def test_bad_configuration_refuses_to_start_with_one_line(
    tmp_path: Path, env: dict[str, str], named: str
) -> None:
    result = run_module(env, *UVICORN, str(free_port()))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0]
    assert "s3cr3t-value" not in result.stderr + result.stdout


@pytest.mark.slow
def test_serve_command_refuses_the_same_way() -> None:
    result = run_module({}, "app", "serve", "--port", str(free_port()))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "WEBHOOK_SECRET" in result.stderr


def test_secret_is_hidden_from_repr_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(webhook_secret=SecretStr("hunter2-value"))
    assert "hunter2-value" not in repr(settings)
    assert "hunter2-value" not in str(settings)
    monkeypatch.setenv("WEBHOOK_SECRET", "hunter2-value")
    monkeypatch.setenv("MAX_BODY_BYTES", "-5")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "MAX_BODY_BYTES" in str(caught.value)
    assert "hunter2-value" not in str(caught.value)


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", "abc")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    monkeypatch.setenv("DATABASE_URL", "sqlite:////data/app.db")
    monkeypatch.setenv("MAX_BODY_BYTES", "1024")
    settings = load_settings()
    assert settings.webhook_secret.get_secret_value() == "abc"
    assert settings.log_level == "DEBUG"
    assert settings.database.target == "/data/app.db"
    assert settings.max_body_bytes == 1024
    assert settings.secrets() == (b"abc",)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["DATABASE_URL", "LOG_LEVEL", "MAX_BODY_BYTES", "WEBHOOK_SECRET_PREVIOUS"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WEBHOOK_SECRET", "abc")
    settings = load_settings()
    assert settings.database_url == "sqlite:///./data/app.db"
    assert settings.log_level == "INFO"
    assert settings.max_body_bytes == 65536


@pytest.mark.parametrize(
    ("url", "scheme", "target"),
    [
        ("sqlite:////data/app.db", "sqlite", "/data/app.db"),
        ("sqlite:///./data/app.db", "sqlite", "data/app.db"),
        ("sqlite:///:memory:", "sqlite", ":memory:"),
        ("postgresql://u:p@h:5432/db", "postgresql", "postgresql://u:p@h:5432/db"),
    ],
)
def test_database_urls(url: str, scheme: str, target: str) -> None:
    parsed = parse_database_url(url)
    assert (parsed.scheme, parsed.target) == (scheme, target)
    assert "u:p" not in repr(parsed)


@pytest.mark.parametrize("url", ["mysql://x", "sqlite://", "sqlite:///", "app.db", ""])
def test_bad_database_urls(url: str) -> None:
    with pytest.raises(ValueError, match="sqlite"):
        parse_database_url(url)


def test_cost_limits_are_read_with_safe_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", "abc")
    settings = load_settings()
    assert settings.max_concurrent_scans == 1
    assert settings.body_buffer_budget_bytes == 64 * 1024 * 1024
    assert settings.http_max_connections is None
    assert (settings.database_pool_size, settings.read_pool_size) == (10, 3)
    monkeypatch.setenv("MAX_CONCURRENT_SCANS", "3")
    monkeypatch.setenv("BODY_BUFFER_BUDGET_BYTES", "8388608")
    monkeypatch.setenv("HTTP_MAX_CONNECTIONS", "")  # as compose passes an unset one
    monkeypatch.setenv("DATABASE_READ_POOL_SIZE", "2")
    settings = load_settings()
    assert settings.max_concurrent_scans == 3
    assert settings.body_buffer_budget_bytes == 8 * 1024 * 1024
    assert settings.http_max_connections is None
    assert settings.read_pool_size == 2


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BODY_BUFFER_BUDGET_BYTES": "1000000"}, "BODY_BUFFER_BUDGET_BYTES"),
        ({"MAX_CONCURRENT_SCANS": "0"}, "MAX_CONCURRENT_SCANS"),
        ({"HTTP_MAX_CONNECTIONS": "0"}, "HTTP_MAX_CONNECTIONS"),
        ({"DATABASE_READ_POOL_SIZE": "0"}, "DATABASE_READ_POOL_SIZE"),
        ({"DATABASE_READ_POOL_SIZE": "9"}, "DATABASE_READ_POOL_SIZE"),
        ({"DATABASE_POOL_SIZE": "2"}, "DATABASE_POOL_SIZE"),
    ],
)
def test_bad_cost_limits_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    monkeypatch.setenv("WEBHOOK_SECRET", "abc")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith(f"invalid configuration: {named}: ")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("pool", "reads"), [(3, 1), (4, 2), (10, 3), (50, 3)])
def test_a_small_pool_keeps_a_connection_for_writes_and_one_for_readiness(
    pool: int, reads: int
) -> None:
    settings = Settings(webhook_secret=SecretStr("abc"), database_pool_size=pool)
    assert settings.read_pool_size == reads
    assert pool - reads - 1 >= 1
