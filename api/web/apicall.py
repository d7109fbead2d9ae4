"""The pages' writes go through the JSON API itself: the same route, checks and answers as a client's
request, dispatched in-process (httpx's ASGI transport; no socket). The signed-in user's key becomes the
``Authorization`` header; the browser's own address and any proxy headers are passed on, so the API's
loopback rule for embedded mode judges the same peer it would have judged."""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Any

import httpx
from fastapi import Request

from ..auth import FORWARDED_HEADERS

TIMEOUT_S = 600.0  # an upload's conversion may take a while; the API bounds its own waits


async def call_api(
    request: Request,
    key: str | None,
    method: str,
    path: str,
    *,
    json: Any = None,
    content: AsyncIterable[bytes] | None = None,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """``method path`` (``/v1/...``) answered by this app for the page's user."""
    sent = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_HEADERS}
    if key:
        sent["Authorization"] = f"Bearer {key}"
    peer = (request.client.host, request.client.port) if request.client else ("0.0.0.0", 0)
    transport = httpx.ASGITransport(app=request.app, client=peer)
    async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=TIMEOUT_S) as client:
        return await client.request(
            method, path, json=json, content=content, params=params, headers=sent | (headers or {})
        )


def problem_errors(r: httpx.Response) -> tuple[str, list[dict[str, str]]]:
    """A problem answer's detail and its per-field errors."""
    try:
        body = r.json()
    except ValueError:
        return f"The API answered {r.status_code}.", []
    if not isinstance(body, dict):
        return f"The API answered {r.status_code}.", []
    return str(body.get("detail") or body.get("title") or r.status_code), list(body.get("errors") or [])
