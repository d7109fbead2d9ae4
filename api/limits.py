"""A cap on request bodies other than uploads (job specs are small): larger ones get a 413 problem
before any route parses them. Uploads stream to disk under their own cap (files.py)."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .problems import PROBLEM_JSON, TYPE_BASE

MAX_BODY_BYTES = 1024**2
STREAMED_PREFIXES = ("/v1/uploads", "/ui/upload-file")  # the upload form caps its own (api/web)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(STREAMED_PREFIXES):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, send)
            return
        # read the body here (at most max_bytes), then replay it to the app
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._too_large(scope, send)
                return
        await self.app(scope, _replay([{"type": "http.request", "body": body}], receive), send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        body = json.dumps(
            {
                "type": TYPE_BASE + "body-too-large",
                "title": "Request Entity Too Large",
                "status": 413,
                "detail": f"The request body is larger than {self.max_bytes} bytes.",
                "instance": scope["path"],
            }
        ).encode()
        headers = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(messages: list[Message], receive: Receive) -> Receive:
    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return replay
