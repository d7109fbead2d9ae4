"""Who is calling: ``Authorization: Bearer <key>`` -> the key's owner.

Keys are stored hashed (store.repo); ``BOOTSTRAP_API_KEY`` is accepted as owner ``admin``; with
``auth_disabled`` (embedded mode on loopback, checked by ``python -m api``) a request without a key is
owner ``local``. Auth uses its own short read-only session, so it never holds a connection for a whole
request nor takes SQLite's write lock.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from store import repo

from .problems import Problem

BOOTSTRAP_OWNER = "admin"
LOCAL_OWNER = "local"

_bearer = HTTPBearer(auto_error=False, description="An API key: `prune keys create` or BOOTSTRAP_API_KEY.")


def _unauthorized(detail: str, error: str | None = None) -> Problem:
    challenge = "Bearer" + (f' error="{error}"' if error else "")
    return Problem(401, detail, slug="unauthorized", headers={"WWW-Authenticate": challenge})


def current_owner(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    settings = request.app.state.settings
    if creds is None or not creds.credentials:
        if settings.auth_disabled:
            return LOCAL_OWNER
        raise _unauthorized("An API key is required: send `Authorization: Bearer <key>`.")
    key = creds.credentials
    boot = settings.bootstrap_api_key
    if boot and hmac.compare_digest(key.encode(), boot.encode()):
        return BOOTSTRAP_OWNER
    with request.app.state.read_sessions() as s:
        owner = repo.owner_of_key(s, key)
    if owner is None:
        raise _unauthorized("The API key is unknown or revoked.", "invalid_token")
    return owner


OwnerDep = Annotated[str, Depends(current_owner)]
