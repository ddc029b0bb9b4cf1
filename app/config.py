"""Settings, read from the environment only (12-factor)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
WHSEC_PREFIX = "whsec_"


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable and fits on one line."""


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    """A parsed `DATABASE_URL`: which backend, and where."""

    scheme: Literal["sqlite", "postgresql"]
    # For SQLite: a filesystem path or ":memory:". For PostgreSQL: the URL as given.
    target: str

    @property
    def is_memory(self) -> bool:
        return self.scheme == "sqlite" and self.target == ":memory:"

    def __repr__(self) -> str:
        # A PostgreSQL URL may carry a password; never print it.
        shown = self.target if self.scheme == "sqlite" else "postgresql://***"
        return f"DatabaseURL({self.scheme!r}, {shown!r})"


def standard_webhook_key(secret: str) -> bytes:
    """The HMAC key a Standard Webhooks sender derives from `secret`.

    A `whsec_` secret is `whsec_` and the base64 of the key (padding optional); any other
    secret is its own UTF-8 bytes, as for X-Signature.
    """
    if not secret.startswith(WHSEC_PREFIX):
        return secret.encode()
    encoded = secret.removeprefix(WHSEC_PREFIX)
    error = ValueError("starts with whsec_, so the rest must be the base64 of the key")
    unpadded = encoded.rstrip("=")
    try:
        key = base64.b64decode(unpadded + "=" * (-len(unpadded) % 4), validate=True)
    except binascii.Error:
        raise error from None
    # Canonical only (padded or not): stray low bits in the last digit, or padding in
    # the wrong amount, are copy-and-paste accidents.
    canonical = base64.b64encode(key).decode("ascii")
    if not key or encoded not in (canonical, canonical.rstrip("=")):
        raise error
    return key


def parse_database_url(url: str) -> DatabaseURL:
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path:
            raise ValueError("a SQLite URL needs a path, e.g. sqlite:///./data/app.db")
        if path == ":memory:":
            return DatabaseURL("sqlite", ":memory:")
        # sqlite:////data/app.db keeps its leading slash: an absolute path.
        return DatabaseURL("sqlite", str(Path(path)))
    if url.startswith(("postgresql://", "postgres://")):
        return DatabaseURL("postgresql", url)
    scheme = url.split(":", 1)[0] if ":" in url else url
    raise ValueError(
        f"unsupported scheme {scheme[:20]!r}; expected sqlite:///<path>, "
        "sqlite:///:memory: or postgresql://user:pass@host:5432/db"
    )


class DatabaseSettings(BaseSettings):
    """What reaching the database needs: all that `python -m app init-db` reads."""

    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", frozen=True
    )

    database_url: str = "sqlite:///./data/app.db"
    # PostgreSQL only: connections per process in all (one for readiness checks, the read
    # pool, the rest for writes: docs/limits.md), and how long start-up waits for the
    # database to accept connections (compose may start the API first).
    database_pool_size: int = Field(default=10, ge=3, le=500)
    # Of those, the reads' (unset: 3, or what a small pool leaves).
    database_read_pool_size: int | None = Field(default=None, ge=1, le=498)
    database_startup_timeout_seconds: float = Field(default=30.0, ge=0, le=600)

    @field_validator("database_url")
    @classmethod
    def _known_database_url(cls, value: str) -> str:
        parse_database_url(value)
        return value

    @field_validator("database_read_pool_size")
    @classmethod
    def _reads_leave_room(cls, value: int | None, info: ValidationInfo) -> int | None:
        pool = info.data.get("database_pool_size")
        if value is not None and isinstance(pool, int) and value > pool - 2:
            raise ValueError(
                f"must leave DATABASE_POOL_SIZE ({pool}) a connection for writes and one for"
                " readiness checks"
            )
        return value

    @property
    def read_pool_size(self) -> int:
        """Connections for reads, out of database_pool_size."""
        if self.database_read_pool_size is not None:
            return self.database_read_pool_size
        return max(1, min(3, self.database_pool_size - 2))

    @property
    def database(self) -> DatabaseURL:
        return parse_database_url(self.database_url)


class Settings(DatabaseSettings):
    webhook_secret: SecretStr
    webhook_secret_previous: SecretStr | None = None
    log_level: LogLevel = "INFO"
    max_body_bytes: int = Field(default=65536, ge=1, le=16 * 1024 * 1024)
    # How long a webhook waits for its row to be committed before answering 503.
    write_timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    # How long a read (/messages, /stats) may take before it is abandoned with a 503.
    read_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    # Reads that scan (a `q` under 3 characters, a deep offset) running at once; the
    # others wait for a turn within their deadline (docs/limits.md).
    max_concurrent_scans: int = Field(default=2, ge=1, le=64)
    # How long the SQLite writer waits on a lock held by another process.
    sqlite_busy_timeout_ms: int = Field(default=1000, ge=0, le=60_000)
    retry_after_seconds: int = Field(default=1, ge=1, le=3600)
    docs_enabled: bool = True
    # How far a Standard Webhooks timestamp may be behind or ahead of our clock.
    webhook_tolerance_past_seconds: int = Field(default=300, ge=1, le=86400)
    webhook_tolerance_future_seconds: int = Field(default=300, ge=1, le=86400)
    # POST /webhook/whatsapp and its handshake answer 404 until both are set.
    whatsapp_app_secret: SecretStr | None = None
    whatsapp_verify_token: SecretStr | None = None
    # Meta documents webhook payloads of up to 3 MB.
    whatsapp_max_body_bytes: int = Field(default=3 * 1024 * 1024, ge=1, le=16 * 1024 * 1024)
    # Request bodies held in memory at once, across all requests of the process; after
    # the two limits above, which it must hold (a validator reads them).
    body_buffer_budget_bytes: int = Field(default=64 * 1024 * 1024, ge=1, le=4 * 1024**3)
    # Connection limits of `python -m app serve` (see app/server/).
    http_max_head_bytes: int = Field(default=65536, ge=4096, le=16 * 1024 * 1024)
    http_head_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    http_body_timeout_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Open connections at most; unset: what RLIMIT_NOFILE leaves room for, up to 1000.
    http_max_connections: int | None = Field(default=None, ge=1, le=1_000_000)

    @field_validator(
        "webhook_secret_previous", "whatsapp_app_secret", "whatsapp_verify_token", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Compose passes an unset variable as "", which means "not configured".
        return None if value == "" else value

    @field_validator(
        "webhook_secret", "webhook_secret_previous", "whatsapp_app_secret", "whatsapp_verify_token"
    )
    @classmethod
    def _secret_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must be a non-empty string")
        return value

    @field_validator("webhook_secret", "webhook_secret_previous")
    @classmethod
    def _whsec_is_base64(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            standard_webhook_key(value.get_secret_value())
        return value

    @field_validator("http_max_connections", "database_read_pool_size", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("body_buffer_budget_bytes")
    @classmethod
    def _budget_holds_the_largest_body(cls, value: int, info: ValidationInfo) -> int:
        limits = [info.data.get(name) for name in ("max_body_bytes", "whatsapp_max_body_bytes")]
        largest = max((limit for limit in limits if isinstance(limit, int)), default=0)
        if value < largest:
            raise ValueError(
                f"must be at least the largest accepted body ({largest} bytes:"
                " MAX_BODY_BYTES or WHATSAPP_MAX_BODY_BYTES)"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.strip().upper() if isinstance(value, str) else value

    def secrets(self) -> tuple[bytes, ...]:
        """The accepted HMAC keys, current first."""
        keys = [self.webhook_secret.get_secret_value().encode()]
        if self.webhook_secret_previous is not None:
            keys.append(self.webhook_secret_previous.get_secret_value().encode())
        return tuple(keys)

    def standard_webhook_keys(self) -> tuple[bytes, ...]:
        """The same keys as Standard Webhooks senders use them, current first."""
        secrets = [self.webhook_secret, self.webhook_secret_previous]
        return tuple(
            standard_webhook_key(secret.get_secret_value())
            for secret in secrets
            if secret is not None
        )

    @property
    def whatsapp_enabled(self) -> bool:
        return self.whatsapp_app_secret is not None and self.whatsapp_verify_token is not None


def load_settings() -> Settings:
    """Read the environment, or raise ConfigError with one line that names the variable."""
    try:
        return Settings()  # the values come from the environment
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc)) from None


def load_database_settings() -> DatabaseSettings:
    """The database part of the environment alone (no secret needed), or ConfigError."""
    try:
        return DatabaseSettings()
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc)) from None


def describe_errors(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        variable = str(error["loc"][0]).upper() if error["loc"] else "settings"
        message = "is required but not set" if error["type"] == "missing" else error["msg"]
        message = message.removeprefix("Value error, ")
        problems.append(f"{variable}: {message}")
    return "invalid configuration: " + "; ".join(problems)
