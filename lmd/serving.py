"""The HTTP protocol of ``lmd serve``: uvicorn's h11 protocol with a timeout on reading a request's headers.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive`` but has no limit on
how long a client may take to send a request's headers: a client that sends half a request line
holds its connection (and a file descriptor) for as long as it likes. This one closes a
connection whose request headers are not complete ``LMD_API_HEADER_TIMEOUT_S`` after the
connection opened or after the previous answer. Slow bodies are bounded by the API's body
middleware (``api.middleware.BodyLimit``); the rest (TLS, many slow connections from one
address) is a reverse proxy's job (docs/service.md "Slow clients").
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from lmd.wiring import load_settings


class HeaderTimeoutH11Protocol(H11Protocol):
    """h11 with a deadline for each request's headers (see the module's docstring)."""

    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in: the request runs
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._await_headers()  # the next request of a keep-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _await_headers(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(load_settings(cached=True).api_header_timeout_s, self._headers_too_slow)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()
