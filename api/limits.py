"""Request body size limit, enforced on the stream (a missing or false Content-Length does not get past).

However the body arrives (declared length, chunked, or a lie), a body over the limit is answered 413: the
app sees the end of the body when the limit is crossed, whatever it then answers is dropped, and the 413
goes out instead (the app would otherwise answer 400, "error parsing the body")."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import MEDIA_TYPE, TYPES


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, by_path: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.by_path = by_path or {}  # larger limits for given paths (data set uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.by_path.get(scope["path"], self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, limit)
        seen = 0
        exceeded = False
        started = False

        async def counted() -> Message:
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                exceeded = True
                return {"type": "http.disconnect"}  # the app stops reading; its answer is replaced below
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if exceeded:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._refuse(send, limit)

    async def _refuse(self, send: Send, limit: int) -> None:
        body = json.dumps(
            {
                "type": TYPES[413],
                "title": "Content Too Large",
                "status": 413,
                "detail": f"request body larger than {limit} bytes",
            }
        ).encode()
        headers = [(b"content-type", MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
