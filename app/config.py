"""Settings, read from the environment only (12-factor)."""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.database_config import DatabaseSettings
from app.setting_values import (
    SecretFileError,
    parse_admin_tokens,
    parse_allowed_hosts,
    parse_tokens,
)

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
WHSEC_PREFIX = "whsec_"
# The Standard Webhooks specification's bounds on a whsec_ key, in bytes.
WHSEC_MIN_BYTES = 24
# Below these, start-up warns: a shared secret a person typed, a verify token guessable.
SECRET_WARN_BYTES = 32
VERIFY_TOKEN_WARN_CHARS = 16
# Loopback by name and address, any port: what a browser on this machine sends when it
# means this service, and never what a DNS-rebinding page sends.
DEFAULT_ALLOWED_HOSTS = "localhost,127.0.0.1,[::1]"


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable and fits on one line."""


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
    # others wait for a turn within their deadline (docs/limits.md). One: on PostgreSQL a
    # scan takes a database core at full priority, and two of them took the 2-core test
    # machine from the inserts (docs/performance.md#cost-bounds-under-attack).
    max_concurrent_scans: int = Field(default=1, ge=1, le=64)
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
    # The console (app/static/console) at `/`, and how many refused deliveries it keeps.
    console_enabled: bool = True
    rejections_kept: int = Field(default=10_000, ge=1, le=1_000_000)
    # How long a console sign-in lasts (app/session.py).
    session_ttl_seconds: int = Field(default=12 * 3600, ge=60, le=30 * 86400)
    # Read access (app/access.py, docs/security.md). Unset READ_TOKENS: reads are open.
    read_tokens: SecretStr | None = None
    metrics_token: SecretStr | None = None
    allow_open_reads: bool = False
    allowed_hosts: str = DEFAULT_ALLOWED_HOSTS
    # The data lifecycle (docs/lifecycle.md). Unset RETENTION_DAYS: messages are kept.
    retention_days: float | None = Field(default=None, gt=0, le=36500)
    # How long a purged message's tombstone refuses a redelivery of it.
    tombstone_days: float = Field(default=30.0, ge=0, le=36500)
    retention_interval_seconds: float = Field(default=10.0, gt=0, le=86400)
    # `name:token,...`: who may erase. Unset: the erasure endpoints answer 404.
    admin_tokens: SecretStr | None = None

    @field_validator(
        "webhook_secret_previous",
        "whatsapp_app_secret",
        "whatsapp_verify_token",
        "read_tokens",
        "metrics_token",
        "allow_open_reads",
        "allowed_hosts",
        "retention_days",
        "tombstone_days",
        "retention_interval_seconds",
        "admin_tokens",
        "http_max_connections",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object, info: ValidationInfo) -> object:
        # Compose passes an unset variable as "", which means "not configured".
        if value != "":
            return value
        field = cls.model_fields[info.field_name or ""]
        return field.get_default()

    @field_validator(
        "webhook_secret", "webhook_secret_previous", "whatsapp_app_secret", "whatsapp_verify_token"
    )
    @classmethod
    def _secret_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        secret = value.get_secret_value()
        if not secret.strip():
            raise ValueError("must be a non-empty string")
        if secret != secret.strip():
            raise ValueError(
                "must not start or end with whitespace (a stray space or newline from copying it?)"
            )
        return value

    @field_validator("webhook_secret", "webhook_secret_previous")
    @classmethod
    def _whsec_is_base64(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            secret = value.get_secret_value()
            key = standard_webhook_key(secret)
            if secret.startswith(WHSEC_PREFIX) and len(key) < WHSEC_MIN_BYTES:
                raise ValueError(
                    f"a whsec_ key must decode to at least {WHSEC_MIN_BYTES} bytes"
                    " (the Standard Webhooks minimum)"
                )
        return value

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

    @field_validator("read_tokens", "metrics_token")
    @classmethod
    def _tokens_well_formed(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_tokens(value.get_secret_value())
        return value

    @field_validator("admin_tokens")
    @classmethod
    def _admin_tokens_well_formed(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_admin_tokens(value.get_secret_value())
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_well_formed(cls, value: str) -> str:
        parse_allowed_hosts(value)
        return value

    @model_validator(mode="after")
    def _public_url_needs_read_tokens(self) -> Settings:
        # The WhatsApp endpoint must be reachable from Meta, and everything else on the
        # same listener with it: open reads there are a decision, never a default.
        if self.whatsapp_enabled and self.read_tokens is None and not self.allow_open_reads:
            raise ValueError(
                "READ_TOKENS: must be set when the WhatsApp endpoint is enabled (it needs a"
                " public URL, and /messages shares it); set ALLOW_OPEN_READS=true to serve"
                " reads to anyone instead"
            )
        return self

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

    def read_token_list(self) -> tuple[str, ...]:
        """The accepted read tokens; empty when READ_TOKENS is unset (reads are open)."""
        return () if self.read_tokens is None else parse_tokens(self.read_tokens.get_secret_value())

    def metrics_token_list(self) -> tuple[str, ...]:
        if self.metrics_token is None:
            return ()
        return parse_tokens(self.metrics_token.get_secret_value())

    def admin_credentials(self) -> tuple[tuple[str, str], ...]:
        """(name, token) of every admin token; empty when ADMIN_TOKENS is unset."""
        if self.admin_tokens is None:
            return ()
        return parse_admin_tokens(self.admin_tokens.get_secret_value())

    def allowed_host_names(self) -> frozenset[str] | None:
        """The hosts requests may name (lower case, IPv6 in brackets); None: any."""
        return parse_allowed_hosts(self.allowed_hosts)

    def weak_secrets(self) -> list[tuple[str, str]]:
        """(variable, why) for each secret that works but is weaker than it should be.

        Never the value, nor its length: only the rule it falls short of.
        """
        found = []
        for name in ("webhook_secret", "webhook_secret_previous", "whatsapp_app_secret"):
            secret: SecretStr | None = getattr(self, name)
            if secret is None:
                continue
            value = secret.get_secret_value()
            # A whsec_ key is random by construction, and at least 24 bytes (checked above).
            if not value.startswith(WHSEC_PREFIX) and len(value.encode()) < SECRET_WARN_BYTES:
                found.append(
                    (
                        name.upper(),
                        f"shorter than {SECRET_WARN_BYTES} bytes: a short shared secret can"
                        " be recovered offline from one signed request; use e.g."
                        " openssl rand -hex 32",
                    )
                )
        token = self.whatsapp_verify_token
        if token is not None and len(token.get_secret_value()) < VERIFY_TOKEN_WARN_CHARS:
            found.append(
                (
                    "WHATSAPP_VERIFY_TOKEN",
                    f"shorter than {VERIFY_TOKEN_WARN_CHARS} characters: anyone who guesses it"
                    " can subscribe; use e.g. openssl rand -hex 16",
                )
            )
        return found


def load_settings() -> Settings:
    """Read the environment, or raise ConfigError with one line that names the variable."""
    try:
        return Settings()  # the values come from the environment
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc)) from None
    except SecretFileError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def load_database_settings() -> DatabaseSettings:
    """The database part of the environment alone (no secret needed), or ConfigError."""
    try:
        return DatabaseSettings()
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc)) from None
    except SecretFileError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def describe_errors(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        message = "is required but not set" if error["type"] == "missing" else error["msg"]
        message = message.removeprefix("Value error, ")
        # A rule across settings names its variables in its own message.
        problems.append(f"{str(error['loc'][0]).upper()}: {message}" if error["loc"] else message)
    return "invalid configuration: " + "; ".join(problems)
