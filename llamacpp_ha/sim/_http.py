"""llama-server's connection quirk, reproduced: the TCP connection is closed after every streamed
response although its headers said keep-alive (shared/llama-server-api.md). A client that reuses
the pooled connection gets "Server disconnected without sending a response"; the balancer must
retry that, and over real sockets it now has to."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["http_protocol"]


def http_protocol(close_after_stream: bool) -> type[asyncio.Protocol] | str:
    """uvicorn's HTTP protocol class for a simulated llama-server (``uvicorn.Config(http=...)``)."""
    if not close_after_stream:
        return "auto"
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard]
        return "auto"

    class CloseAfterStream(Base):
        def on_response_complete(self) -> None:
            cycle: Any = getattr(self, "cycle", None)
            # A streamed (chunked) response: llama-server closes the connection right after it.
            if cycle is not None and cycle.chunked_encoding and not self.transport.is_closing():
                super().on_response_complete()
                self.transport.close()
                return
            super().on_response_complete()

    return CloseAfterStream
