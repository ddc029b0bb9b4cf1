"""Who may erase (ADMIN_TOKENS), and the audit line every erasure writes.

Erasure is not a read: READ_TOKENS do not grant it, and these tokens grant nothing else.
Without ADMIN_TOKENS the erasure endpoints answer 404, as if they did not exist.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from app.api.deps import SettingsDep
from app.middleware import request_info
from app.storage.lifecycle import Erasure

audit_log = logging.getLogger("app.audit")

REALM = 'Bearer realm="webhook-receiver"'


def identify(credentials: tuple[tuple[str, str], ...], authorization: list[str]) -> str | None:
    """The name of the admin whose bearer token came, else None.

    The token's digest is compared with every configured token's, all of them, with
    compare_digest: the time taken tells neither which token nor how much of one matched.
    """
    if len(authorization) != 1:
        return None
    scheme, _, token = authorization[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    digest = hashlib.sha256(token.strip().encode()).digest()
    found = None
    for name, expected in credentials:
        if hmac.compare_digest(digest, hashlib.sha256(expected.encode()).digest()):
            found = name
    return found


async def require_admin(request: Request, settings: SettingsDep) -> str:
    """The admin's name; 404 when ADMIN_TOKENS is unset, 401 without a valid token.

    A dependency, so FastAPI runs it before it validates the path: a caller who is not
    an admin learns nothing about what the path should look like.
    """
    credentials = settings.admin_credentials()
    if not credentials:
        raise HTTPException(404, "Not Found")
    name = identify(credentials, request.headers.getlist("authorization"))
    if name is None:
        raise HTTPException(
            401, "missing or invalid admin token", headers={"WWW-Authenticate": REALM}
        )
    return name


AdminDep = Annotated[str, Depends(require_admin)]


def audit_erasure(request: Request, actor: str, kind: str, erasure: Erasure) -> None:
    """One line per erasure: who, what kind, how much; the target only as a keyed hash."""
    audit_log.warning(
        "erasure",
        extra={
            "event": "erasure",
            "actor": actor,
            "kind": kind,
            "target": erasure.target,
            "deleted": erasure.deleted,
            "tombstones": erasure.tombstones,
            "request_id": request_info(request.scope).request_id,
        },
    )
