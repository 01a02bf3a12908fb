"""Headers every response carries, so that a browser runs nothing but the API's own files and never frames a
page of it. A pure ASGI middleware: streamed answers (event streams, downloads) get them too, unbuffered.

The interactive docs (/docs, /redoc; off unless SDXL_INTERACTIVE_DOCS) are FastAPI's pages: they load Swagger UI
and ReDoc from jsDelivr and start them with an inline script, so those two paths, and only they, allow both.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Images may come from the storage's own origin (signed S3 URLs) and from data: URLs; every script, style and
# request is the API's own.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob: https: http:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
CDN = "https://cdn.jsdelivr.net"
DOCS_CSP = (
    f"default-src 'self'; script-src 'self' 'unsafe-inline' {CDN}; style-src 'self' 'unsafe-inline' {CDN}; "
    f"img-src 'self' data: https:; font-src 'self' data: {CDN} https://fonts.gstatic.com; connect-src 'self'; "
    "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc"})


class SecurityHeaders:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = (DOCS_CSP if scope["path"] in DOCS_PATHS else CSP).encode()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _OURS]
                message = {
                    **message,
                    "headers": [
                        *headers,
                        (b"content-security-policy", csp),
                        (b"x-content-type-options", b"nosniff"),
                        (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
                        (b"referrer-policy", b"no-referrer"),  # signed URLs must not leak in Referer headers
                    ],
                }
            await send(message)

        await self.app(scope, receive, send_with_headers)


_OURS = {b"content-security-policy", b"x-content-type-options", b"x-frame-options", b"referrer-policy"}
