"""What some settings hold, read and checked apart from the Settings class itself.

- `<NAME>_FILE`: a secret read from a file (Docker and Kubernetes secrets), as a
  pydantic-settings source placed before the environment (see config.DatabaseSettings);
- bearer-token lists (READ_TOKENS, METRICS_TOKEN) and the Host allowlist (ALLOWED_HOSTS).

It imports nothing of ours, like config itself.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Collection
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

# Secret files are small; anything bigger is a wrong path (a log, a device).
MAX_BYTES = 65536
# Read and metrics tokens: RFC 6750's b64token, at least this long.
TOKEN_MIN_CHARS = 16
_B64TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
# A DNS name, lower case; a leading dot stands for the name and all its subdomains.
_HOST_NAME = re.compile(r"\.?[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


class SecretFileError(Exception):
    """A `_FILE` setting cannot be used; the message names the variable, never the content."""


class SecretFiles(PydanticBaseSettingsSource):
    """Reads NAME_FILE, for each field in `names`, as the value of NAME.

    One trailing newline is dropped (editors and `echo` add one); anything else in the
    file is the value, so the settings' own checks then refuse stray whitespace. NAME and
    NAME_FILE both set is an error, as is a file that cannot be read. Empty means unset,
    for both, as Compose passes a variable it has no value for.
    """

    def __init__(self, settings_cls: type[BaseSettings], names: Collection[str]) -> None:
        super().__init__(settings_cls)
        self.names = names

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads every field at once

    def __call__(self) -> dict[str, Any]:
        # Case-insensitive, as the settings read the environment.
        environ = {name.lower(): value for name, value in os.environ.items()}
        values: dict[str, Any] = {}
        for name in self.settings_cls.model_fields:
            path = environ.get(f"{name}_file") if name in self.names else None
            if not path:
                continue
            variable = name.upper()
            if environ.get(name):
                raise SecretFileError(
                    f"{variable} and {variable}_FILE are both set; set one of them"
                )
            values[name] = read_secret_file(f"{variable}_FILE", path)
        return values


def read_secret_file(variable: str, path: str) -> str:
    """The file's text less one trailing newline, or SecretFileError naming `variable`."""
    shown = repr(path[:256])
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SecretFileError(f"{variable}: cannot read {shown}: {reason}") from None
    if len(raw) > MAX_BYTES:
        raise SecretFileError(f"{variable}: {shown} is over {MAX_BYTES} bytes; the wrong file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretFileError(f"{variable}: {shown} is not UTF-8 text") from None
    if text.endswith("\n"):
        return text[:-2] if text.endswith("\r\n") else text[:-1]
    return text


def parse_tokens(value: str) -> tuple[str, ...]:
    """A comma-separated list of bearer tokens, or ValueError saying what is wrong."""
    tokens = tuple(value.split(","))
    for token in tokens:
        if not token:
            raise ValueError("has an empty entry (a stray comma?)")
        if token != "".join(token.split()):
            raise ValueError("must not contain whitespace (separate tokens by commas alone)")
        if len(token) < TOKEN_MIN_CHARS:
            raise ValueError(
                f"each token needs at least {TOKEN_MIN_CHARS} characters"
                " (e.g. openssl rand -hex 32)"
            )
        if _B64TOKEN.fullmatch(token) is None:
            raise ValueError("a token may hold letters, digits and -._~+/ (then = padding)")
    return tokens


def parse_allowed_hosts(value: str) -> frozenset[str] | None:
    """The lower-cased host names ALLOWED_HOSTS lists (IPv6 in brackets); None for `*`."""
    entries = [entry.strip().lower() for entry in value.split(",")]
    if entries == ["*"]:
        return None
    hosts = set()
    for entry in entries:
        if entry == "*":
            raise ValueError("* turns the check off, so it must stand alone")
        if not entry:
            raise ValueError("has an empty entry (a stray comma?)")
        hosts.add(_normal_host(entry))
    return frozenset(hosts)


def _normal_host(entry: str) -> str:
    bracketed = entry.startswith("[") and entry.endswith("]")
    address = entry[1:-1] if bracketed else entry
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        if bracketed or ":" in entry:
            raise ValueError(
                f"{entry[:64]!r} is not a host name: give names without a port "
                "(any port is accepted) and IPv6 addresses as [::1]"
            ) from None
        name = entry.removesuffix(".")  # the root's dot: "localhost." is localhost
        if _HOST_NAME.fullmatch(name) is None:
            raise ValueError(f"{entry[:64]!r} is not a host name") from None
        return name
    return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed
