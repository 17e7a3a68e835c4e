"""uvicorn's HTTP protocol, hardened: its own errors in OpenAI's shape, a deadline for request
headers, and a connection limit answered in JSON."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from llamacpp_ha._errors import openai_error

__all__ = ["http_protocol"]

_LINGER_S = 2.0
"""How long a connection we answered on our own stays open to drop what the client still sends."""
_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 503: b"Service Unavailable"}


def http_protocol(*, header_timeout_s: float = 10.0, max_connections: int | None = None) -> type[asyncio.Protocol]:
    """uvicorn's fastest HTTP protocol class (``uvicorn.Config(http=...)`` takes it), with:

    - its ``400`` for an unparsable request (a bad ``Content-Length``, a method like ``FOO``, a
      control character in a header) in OpenAI's JSON error shape instead of ``text/plain``;
    - ``408`` and the connection closed when a request's headers are not complete
      ``header_timeout_s`` after its first byte (uvicorn has no such deadline: a client sending a
      header line a minute holds its connection forever);
    - ``503`` in JSON beyond ``max_connections`` open connections.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard]
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class HardenedProtocol(Base):
        _header_timer: asyncio.TimerHandle | None = None
        _lingering = False

        def _answer(self, status: int, message: str, error_type: str, code: str) -> None:
            transport: Any = self.transport
            if transport.is_closing():
                return
            cycle: Any = getattr(self, "cycle", None)
            if cycle is not None and cycle.response_started and not cycle.response_complete:
                # The app's answer is half written: ours cannot follow it. Close as uvicorn would.
                transport.close()
                return
            body = json.dumps(openai_error(message, error_type, code)).encode()
            head = (
                b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                % (status, _REASONS[status], len(body))
            )
            transport.write(head + body)
            if cycle is not None and not cycle.response_complete:
                # The app runs for this request (its body failed to parse, say): it has lost the
                # request. Its reads see a disconnect and its writes go nowhere, as when a client leaves.
                cycle.disconnected = True
                cycle.message_event.set()
            # Lingering close: a client still sending (a large body) would get a reset from the
            # kernel if we closed with its bytes unread, and lose this answer with it. Say we are
            # done writing, drop what still arrives, and close shortly.
            self._lingering = True
            if transport.can_write_eof():
                transport.write_eof()
            loop: asyncio.AbstractEventLoop = self.loop
            loop.call_later(_LINGER_S, transport.close)

        def data_received(self, data: bytes) -> None:
            if not self._lingering:
                super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            self._answer(400, msg, "invalid_request_error", "invalid_http_request")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:
                loop: asyncio.AbstractEventLoop = self.loop
                self._header_timer = loop.call_later(header_timeout_s, self._headers_too_slow)

        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            if max_connections is not None and len(self.connections) > max_connections:
                message = f"The server has {max_connections} connections open; try again shortly."
                self._answer(503, message, "unavailable_error", "too_many_connections")
                return
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            message = f"The request headers did not arrive within {header_timeout_s:g} s."
            self._answer(408, message, "invalid_request_error", "request_timeout")

    return HardenedProtocol
