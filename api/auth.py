"""Who is calling: ``Authorization: Bearer <key>`` -> the key's owner.

Keys are stored hashed (store.repo) and revocable (``python -m store keys revoke``; the next request
with a revoked key is a 401: keys are looked up on every request, never cached). ``BOOTSTRAP_API_KEY`` is
accepted as owner ``admin``. With ``auth_disabled`` (embedded mode) a request without a key is owner
``local``, but only from a loopback peer that no proxy forwarded: ``python -m api`` refuses to bind
elsewhere, and the app itself refuses anyone else, should it be served some other way.

Every route needs a key except ``/healthz`` and ``/readyz`` (probes; they reveal no one's data) and the
OpenAPI document with ``/docs`` (the same for everyone, and a browser needs the page before it can send
a key). The catalog and ``/metrics`` need a key too: everything under ``/v1`` alike, and a scraper sends
one as easily as a client. Each authenticated request also takes a token of the owner's rate quota
(api/quotas.py). Auth uses its own short read-only session, so it never holds a connection for a whole
request nor takes SQLite's write lock.
"""

from __future__ import annotations

import hmac
import ipaddress
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


# Headers a reverse proxy adds: a request carrying one came from elsewhere, whatever its peer address.
FORWARDED_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def local_peer(request: Request) -> bool:
    """The request comes straight from this machine: a loopback peer, not forwarded by a proxy."""
    host = request.client.host if request.client else ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    return loopback and not any(h in request.headers for h in FORWARDED_HEADERS)


def current_owner(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The caller's owner (401 without a valid key), after taking a token of its rate quota (429)."""
    owner = _authenticate(request, creds)
    request.app.state.rate_limiter.check(owner)
    return owner


def _authenticate(request: Request, creds: HTTPAuthorizationCredentials | None) -> str:
    settings = request.app.state.settings
    if creds is None or not creds.credentials:
        if settings.auth_disabled and local_peer(request):
            return LOCAL_OWNER
        if settings.auth_disabled:
            raise _unauthorized("Without a key only this machine's own loopback clients are served.")
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
