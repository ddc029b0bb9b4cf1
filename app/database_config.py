"""What reaching the database needs: all that `python -m app init-db` reads.

Settings (app/config.py) extends DatabaseSettings with everything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from app.setting_values import SecretFiles


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


# The settings that may come from a file (NAME_FILE): every secret, and the database URLs
# (they hold a password). A new secret setting is added here.
FILE_SETTINGS = frozenset(
    {
        "webhook_secret",
        "webhook_secret_previous",
        "whatsapp_app_secret",
        "whatsapp_verify_token",
        "read_tokens",
        "metrics_token",
        "admin_tokens",
        "database_url",
        "database_direct_url",
    }
)


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

    # Not in repr: a PostgreSQL URL carries a password.
    database_url: str = Field(default="sqlite:///./data/app.db", repr=False)
    # PostgreSQL only: connections per process in all (one for readiness checks, the read
    # pool, the rest for writes: docs/limits.md), and how long start-up waits for the
    # database to accept connections (compose may start the API first).
    database_pool_size: int = Field(default=10, ge=3, le=500)
    # Of those, the reads' (unset: 3, or what a small pool leaves).
    database_read_pool_size: int | None = Field(default=None, ge=1, le=498)
    database_startup_timeout_seconds: float = Field(default=30.0, ge=0, le=600)
    # `pgbouncer`: DATABASE_URL is a transaction-mode pooler; DATABASE_DIRECT_URL, the
    # server itself, then serves migrations and LISTEN (docs/postgres.md, PgBouncer).
    database_pooler: Literal["none", "pgbouncer"] = "none"
    database_direct_url: str | None = Field(default=None, repr=False)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env reading here: the scripts and Compose handle .env, the service reads
        # only its environment (and the files it names).
        return (init_settings, SecretFiles(settings_cls, FILE_SETTINGS), env_settings)

    @field_validator("database_url")
    @classmethod
    def _known_database_url(cls, value: str) -> str:
        parse_database_url(value)
        return value

    @field_validator(
        "database_read_pool_size", "database_direct_url", "database_pooler", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: object, info: ValidationInfo) -> object:
        return cls.model_fields[info.field_name or ""].default if value == "" else value

    @model_validator(mode="after")
    def _pooler_needs_a_direct_url(self) -> DatabaseSettings:
        direct = parse_database_url(self.database_direct_url or self.database_url)
        if self.database_pooler != "none" and (
            self.database_direct_url is None or self.database.scheme != direct.scheme
        ):
            raise ValueError(
                "DATABASE_DIRECT_URL: must be set, to PostgreSQL itself, with DATABASE_POOLER"
                " (migrations and the feed's LISTEN need a session, not a pooled connection)"
            )
        return self

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

    @property
    def direct_database_url(self) -> str:
        """PostgreSQL itself, for what needs a session (migrations, LISTEN, export)."""
        return self.database_direct_url or self.database.target
