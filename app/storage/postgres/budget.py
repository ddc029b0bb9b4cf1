"""The connection budget: what one process will hold, against what the server allows it.

Every replica holds DATABASE_POOL_SIZE connections and the feed's LISTEN connection
(docs/postgres.md, Connection budget). A replica whose own connections do not fit can
never be healthy: past the server's limit, its pools fail to grow under load and it
answers 503s at random. So start-up refuses it, naming the numbers. What the other
replicas hold already is only a warning: they may be on their way out (a rolling deploy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

from app.storage.base import StorageUnavailable

logger = logging.getLogger("app.storage")

# reserved_connections exists from PostgreSQL 16 on; missing_ok gives NULL before that.
LIMITS = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true), '0')::int,
       r.rolsuper, r.rolconnlimit, d.datconnlimit,
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')::int
  FROM pg_roles r, pg_database d
 WHERE r.rolname = current_user AND d.datname = current_database()
"""


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_connections: int
    superuser_reserved: int
    reserved: int
    superuser: bool
    role_limit: int  # -1: none
    database_limit: int  # -1: none
    in_use: int  # client connections now, the asking one included

    @property
    def for_the_service(self) -> int:
        # The reserved slots are how an operator gets in when everything else is taken:
        # the service never plans on them, even when it connects as a superuser.
        return self.max_connections - self.superuser_reserved - self.reserved


def store_budget(pool_size: int, *, pooled: bool) -> tuple[int, str]:
    """(connections, what they are) one store holds on PostgreSQL itself."""
    if pooled:
        return 1, "the feed's LISTEN; the pools go through the pooler"
    return pool_size + 1, f"a pool of {pool_size} and the feed's LISTEN"


def budget_refusal(limits: ServerLimits, needed: int, what: str) -> str | None:
    """Why `needed` connections (`what` they are) cannot fit, or None if they can."""
    needs = f"this process needs {needed} connections to PostgreSQL ({what})"
    fix = "lower DATABASE_POOL_SIZE or raise the limit (docs/postgres.md, Connection budget)"
    allowed = limits.for_the_service
    if needed > allowed:
        reserved = f" - reserved_connections {limits.reserved}" if limits.reserved else ""
        return (
            f"{needs}, more than the server allows (max_connections {limits.max_connections}"
            f" - superuser_reserved_connections {limits.superuser_reserved}{reserved}"
            f" = {allowed}); {fix}"
        )
    # Superusers are exempt from both CONNECTION LIMITs.
    for limit, whose in ((limits.role_limit, "role"), (limits.database_limit, "database")):
        if not limits.superuser and 0 <= limit < needed:
            return f"{needs}, more than the {whose}'s CONNECTION LIMIT of {limit}; {fix}"
    return None


async def check_connection_budget(conn: asyncpg.Connection, needed: int, what: str) -> None:
    """Raise StorageUnavailable if `needed` connections cannot fit; warn if they fit only
    once others close."""
    record = await conn.fetchrow(LIMITS)
    if record is None:
        raise StorageUnavailable("cannot read the connection limits: no such role or database")
    limits = ServerLimits(*record)
    refusal = budget_refusal(limits, needed, what)
    if refusal is not None:
        raise StorageUnavailable(refusal)
    # This connection closes before the pools open: it is not counted against them.
    free = limits.for_the_service - (limits.in_use - 1)
    if free < needed:
        logger.warning(
            "the database has fewer free connections than this process needs",
            extra={"needed": needed, "free": free, "max_connections": limits.max_connections},
        )
