"""What wraps every request: the body size limit (one JSON 413 whatever the framing) and the
security headers of the studio's pages (docs/service.md "Headers").

Both are plain ASGI middleware, so a streamed answer (the event stream) passes through untouched.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import ApiError, ErrorBody

# The studio is one page of same-origin files: no inline script or style, no other origin.
# Images are the API's PNGs, the blob: URLs of fetched ones, and data: for the dropped PNGs' previews;
# connect-src 'self' is the API itself. Framing is refused (clickjacking) both ways.
STUDIO_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# Every answer: no MIME sniffing (a PNG or JSON never runs as a script), no Referer to other sites.
COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
STUDIO_HEADERS = {"Content-Security-Policy": STUDIO_CSP, "X-Frame-Options": "DENY"}


def is_studio_path(path: str) -> bool:
    """The studio's own files: the page at ``/`` and what it loads from ``/static/``."""
    return path == "/" or path.startswith("/static/")


class SecurityHeaders:
    """Adds ``COMMON_HEADERS`` to every answer and ``STUDIO_HEADERS`` to the studio's files."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = {**COMMON_HEADERS, **(STUDIO_HEADERS if is_studio_path(scope["path"]) else {})}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in extra.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def too_large(max_bytes: int) -> ApiError:
    return ApiError(413, "too_large", f"the body is larger than {max_bytes // 1024} KiB; send less")


class BodyLimit:
    """Refuse a request body over ``max_bytes`` with the JSON 413 of every other error, and one
    that stalls more than ``stall_timeout_s`` between two reads with a JSON 408 (slow clients).

    A declared ``Content-Length`` over the limit is answered before anything is read; a chunked
    body is counted as it is read, and the route's read fails with the same ``ApiError`` (which
    the app's handler turns into ``{code, detail}``). Starlette's own limit answers text/plain
    when a Content-Length is declared, hence this one.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, stall_timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.stall_timeout_s = stall_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.strip().isdigit() and int(declared) > self.max_bytes:
            error = too_large(self.max_bytes)
            body = ErrorBody(code=error.code, detail=str(error.detail))
            # Connection: close: the unread body must not be taken for the next request.
            await JSONResponse(body.model_dump(), status_code=413, headers={"Connection": "close"})(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not (declared.strip() not in ("", "0") or "chunked" in headers.get("transfer-encoding", "").lower()):
            await self.app(scope, receive, send)  # no body: receive() only ever reports the client leaving
            return
        seen, complete = 0, False

        async def counted() -> Message:
            nonlocal seen, complete
            if complete:  # past the body, receive() waits for the client to leave: no deadline then
                return await receive()
            try:
                async with asyncio.timeout(self.stall_timeout_s):  # no new task: a cancel reaches receive() as is
                    message = await receive()
            except TimeoutError:
                raise ApiError(408, "request_timeout", f"the body stalled for {self.stall_timeout_s:g} s "
                                                       "(LMD_API_BODY_TIMEOUT_S); send it again") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise too_large(self.max_bytes)
            return message

        await self.app(scope, counted, send)
