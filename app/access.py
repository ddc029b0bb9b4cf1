"""Who may call what: the Host allowlist and the read-credential rule, per request.

ObservabilityMiddleware asks `AccessPolicy.refusal` about every request before anything
else answers it, the direct routes (POST /webhook) included, so a refused request still
gets a request id, an access line and its metrics.

The rule, deny by default:

- The Host header must name this service (ALLOWED_HOSTS), except on the probes, which
  orchestrators call by pod IP. Checked first: a DNS-rebinding page names its own host.
- PUBLIC_PATHS need no credential: the senders' endpoints, the probes, and the console's
  page, files and sign-in (its data comes from the API, which needs one).
- /metrics takes METRICS_TOKEN or a read token.
- Every other path, present or future, known or not, takes a read credential once
  READ_TOKENS is set (401 rather than 404 for unknown paths: it reveals nothing). With
  READ_TOKENS unset, reads are open, as they have always been.

A new kind of read credential (the console's session cookie) is one more `Credential`
in `read_credentials`; new public paths join PUBLIC_PATHS or PUBLIC_PREFIXES.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from typing import Protocol

from app.config import Settings
from app.session import SessionCookies

RawHeader = tuple[bytes, bytes]
# What a refused request is answered: status, body, headers, and the `result` its access
# line and the refusal counter carry.
Refusal = tuple[int, bytes, list[RawHeader], str]

PROBE_PATHS = frozenset({"/health/live", "/health/ready"})
# The console's page shell, its files and its sign-in are public: the page asks for a
# token itself, and /session is how a browser gets its cookie (app/session.py).
CONSOLE_PATHS = frozenset({"/", "/session"})
PUBLIC_PATHS = frozenset({"/webhook", "/webhook/whatsapp", *PROBE_PATHS, *CONSOLE_PATHS})
PUBLIC_PREFIXES: tuple[str, ...] = ("/static/",)
METRICS_PATH = "/metrics"

REALM = b'Bearer realm="webhook-receiver"'
UNAUTHORIZED_BODY = b'{"detail":"missing or invalid bearer token"}'
BAD_HOST_BODY = b'{"detail":"host not allowed"}'
# The `result` values (metrics.REFUSAL_REASONS labels access_refusals_total with them).
RESULT_BAD_HOST = "invalid_host"
RESULT_MISSING = "missing_token"
RESULT_INVALID = "invalid_token"

# A client that names a host we do not serve is not one to keep a connection open for.
_BAD_HOST: Refusal = (400, BAD_HOST_BODY, [(b"connection", b"close")], RESULT_BAD_HOST)
# RFC 6750: no error code when no credential came (or one of another scheme), and
# invalid_token when a bearer token came but is not one of ours.
_MISSING: Refusal = (401, UNAUTHORIZED_BODY, [(b"www-authenticate", REALM)], RESULT_MISSING)
_INVALID: Refusal = (
    401,
    UNAUTHORIZED_BODY,
    [(b"www-authenticate", REALM + b', error="invalid_token"')],
    RESULT_INVALID,
)
# Host header values seen and allowed, remembered so the usual one costs a dict lookup.
# Bounded: past this many, values are parsed each time (nothing an attacker sends grows
# it, since only allowed hosts are kept).
_HOST_CACHE_SIZE = 64


class Credential(Protocol):
    def check(self, headers: Sequence[RawHeader]) -> bool | None:
        """True: a valid credential came; False: one came, but is not valid; None: none."""


class BearerTokens:
    """`Authorization: Bearer <token>`, for any of a set of tokens.

    The token is hashed and the digest compared with every configured token's digest,
    all of them, with compare_digest: the time taken tells neither which token nor how
    much of one matched, nor its length.
    """

    __slots__ = ("_digests",)

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = tuple(hashlib.sha256(token.encode()).digest() for token in tokens)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def check(self, headers: Sequence[RawHeader]) -> bool | None:
        values = [value for name, value in headers if name == b"authorization"]
        if not values:
            return None
        if len(values) > 1:
            return False
        scheme, _, token = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        digest = hashlib.sha256(token.lstrip(b" ")).digest()
        matched = False
        for expected in self._digests:
            matched |= hmac.compare_digest(digest, expected)
        return matched


class HostAllowlist:
    """The Host header must name one of `names` (None: any host), with any port.

    `seen` holds the raw header values found allowed so far, so that the usual one costs
    a set lookup (see ObservabilityMiddleware). It is bounded, and only allowed values
    enter it: nothing a client invents can grow it.
    """

    __slots__ = ("_exact", "_suffixes", "seen")

    def __init__(self, names: frozenset[str] | None) -> None:
        self._exact = None if names is None else {n.encode() for n in names if n[0] != "."}
        # ".example.com": example.com and every name under it.
        self._suffixes = tuple(n.encode() for n in names or () if n[0] == ".")
        self.seen: set[bytes | None] = set()

    def allows(self, host: bytes | None) -> bool:
        """Whether a request with this Host header (None: none, or several) may go on."""
        if host in self.seen:
            return True
        if self._exact is None:
            allowed = True
        else:
            name = None if host is None else host_name(host)
            allowed = name is not None and (
                name in self._exact
                or any(name.endswith(suffix) or name == suffix[1:] for suffix in self._suffixes)
            )
        if allowed and host is not None and len(self.seen) < _HOST_CACHE_SIZE:
            self.seen.add(host)
        return allowed


def host_name(host: bytes) -> bytes | None:
    """The lower-cased host of a Host header, without its port; None if malformed."""
    host = host.lower()
    if host.startswith(b"["):
        end = host.find(b"]") + 1
        if not end:
            return None
        name, rest = host[:end], host[end:]
    else:
        name, colon, port = host.partition(b":")
        rest = colon + port
    # RFC 3986: the port is digits, possibly none ("localhost:").
    port = rest[1:]
    if rest and (rest[:1] != b":" or len(port) > 5 or not (port.isdigit() or not port)):
        return None
    return name.removesuffix(b".") or None


class AccessPolicy:
    """The rule above, for one app's settings."""

    __slots__ = ("_default", "_hosts", "_rules", "hosts_allowed", "open_paths")

    def __init__(
        self,
        hosts: HostAllowlist,
        read_credentials: Sequence[Credential],
        metrics_credentials: Sequence[Credential],
    ) -> None:
        self._hosts = hosts
        # The credentials a path accepts; an empty tuple is an open path.
        self._default = tuple(read_credentials)
        self._rules: dict[str, tuple[Credential, ...]] = dict.fromkeys(PUBLIC_PATHS, ())
        self._rules[METRICS_PATH] = tuple(metrics_credentials)
        # For the middleware's shortcut: a request naming one of `hosts_allowed` (Host
        # values allowed before) on one of `open_paths` needs no further look.
        self.hosts_allowed = hosts.seen
        self.open_paths = frozenset(path for path, needed in self._rules.items() if not needed)

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        read_tokens = settings.read_token_list()
        read = BearerTokens(read_tokens)
        # The console's session cookie is a read credential too.
        session = SessionCookies(read_tokens)
        metrics = BearerTokens((*settings.metrics_token_list(), *read_tokens))
        return cls(
            HostAllowlist(settings.allowed_host_names()),
            [read, session] if read else [],
            [metrics] if metrics else [],
        )

    @property
    def reads_open(self) -> bool:
        return not self._default

    def refusal(
        self, path: str, host: bytes | None, headers: Sequence[RawHeader]
    ) -> Refusal | None:
        """None if the request may go on; else what to answer. `path` without root_path."""
        if not self._hosts.allows(host) and path not in PROBE_PATHS:
            return _BAD_HOST
        credentials = self._rules.get(path)
        if credentials is None:
            credentials = () if path.startswith(PUBLIC_PREFIXES) else self._default
        if not credentials:
            return None
        verdicts = [credential.check(headers) for credential in credentials]
        if True in verdicts:
            return None
        return _INVALID if False in verdicts else _MISSING
