"""Who is signed in, and the CSRF token of the pages.

The API key a user signs in with is kept in an HttpOnly, SameSite=Strict cookie (Secure over https),
scoped to the pages' path, and checked on every request exactly as a Bearer key is (api/auth.py: hashed
lookup, revocation, the rate quota, embedded mode's loopback-only ``local`` owner). Forms carry a CSRF
token: a random value in a second cookie of the same kind, repeated in a hidden field (double submit);
a POST whose field does not match the cookie, or whose Origin is another site's, is a 403.
"""

from __future__ import annotations

import hmac
import secrets

from fastapi import Request, Response
from fastapi.security import HTTPAuthorizationCredentials

from ..auth import current_owner
from ..problems import Problem

KEY_COOKIE = "prune_key"
CSRF_COOKIE = "prune_csrf"
CSRF_FIELD = "csrf"
PAGES = "/ui"
MAX_KEY_CHARS = 512


def pages_path(request: Request) -> str:
    """Where the pages live, under the app's root path (the cookies' Path)."""
    return request.scope.get("root_path", "") + PAGES


def page_key(request: Request) -> str | None:
    """The API key of the signed-in user, from the cookie."""
    key = request.cookies.get(KEY_COOKIE, "")
    return key if 0 < len(key) <= MAX_KEY_CHARS else None


def owner_from_key(request: Request, key: str | None) -> str:
    """The key's owner as the API sees it (401 problem if none, 429 past the rate quota)."""
    creds = HTTPAuthorizationCredentials(scheme="Bearer", credentials=key) if key else None
    return current_owner(request, creds)


def page_owner(request: Request) -> str | None:
    """The signed-in owner (or embedded mode's ``local`` without a key); None: send to sign-in."""
    try:
        return owner_from_key(request, page_key(request))
    except Problem as p:
        if p.status == 401:
            return None
        raise


def _cookie(request: Request, response: Response, name: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=pages_path(request),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def sign_in(request: Request, response: Response, key: str) -> None:
    _cookie(request, response, KEY_COOKIE, key)


def sign_out(request: Request, response: Response) -> None:
    response.delete_cookie(
        KEY_COOKIE,
        path=pages_path(request),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def csrf_token(request: Request) -> str:
    """This browser's CSRF token: the cookie's, or a new one (``keep_csrf`` then sets the cookie)."""
    token = request.cookies.get(CSRF_COOKIE, "")
    if len(token) != 43:
        token = getattr(request.state, "new_csrf", None) or secrets.token_urlsafe(32)
        request.state.new_csrf = token
    return token


def keep_csrf(request: Request, response: Response) -> None:
    """Set the CSRF cookie when this request made a new token."""
    if (token := getattr(request.state, "new_csrf", None)) is not None:
        _cookie(request, response, CSRF_COOKIE, token)


def check_csrf(request: Request, sent: object) -> None:
    """403 unless the form's token equals the cookie's and the request comes from this site."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    origin = request.headers.get("origin")
    # the host alone: behind a TLS proxy the app may see http while the browser says https
    same_site = origin is None or origin.partition("://")[2] == request.url.netloc
    if not (isinstance(sent, str) and cookie and hmac.compare_digest(sent.encode(), cookie.encode())):
        raise Problem(403, "The form's CSRF token is missing or wrong; reload the page.", slug="csrf")
    if not same_site:
        raise Problem(403, "The form was sent from another site.", slug="csrf")
