from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

import httpx2

from ._leases import Lease

__all__ = ["LeasedStream"]


class LeasedStream(httpx2.AsyncByteStream):
    """A backend's response body that gives its slot back exactly once, when it is finished.

    Finished means: the last byte was read, the consumer closed the response, the backend
    failed, or the consumer stopped reading for longer than the idle deadline (the
    balancer's poller then calls :meth:`aclose` through ``lease.closer``).
    """

    def __init__(
        self,
        upstream: httpx2.Response,
        lease: Lease,
        *,
        sse: bool,
        on_failure: Callable[[Lease, Exception], None],
    ) -> None:
        self._upstream = upstream
        self._lease = lease
        self._sse = sse
        self._on_failure = on_failure
        self._closed = False
        lease.closer = self.aclose

    async def __aiter__(self) -> AsyncIterator[bytes]:
        lease = self._lease
        if self._closed:
            raise httpx2.StreamClosed()
        upstream = self._upstream.stream
        assert isinstance(upstream, httpx2.AsyncByteStream)
        try:
            lease.reading = True
            async for chunk in upstream:
                lease.reading = False
                lease.touch()
                yield chunk
                lease.reading = True
        except httpx2.TransportError as exc:
            if self._closed:
                raise
            self._on_failure(lease, exc)
            if not self._sse:
                raise
            # The caller already has a 200 and part of the stream: end it the way llama-server
            # ends a stream that fails, so SDKs raise a clean API error.
            message = f"The backend {lease.backend.name} failed during the response: {type(exc).__name__}"
            error = {"error": {"message": message, "type": "server_error", "code": "backend_failed"}}
            yield b"data: " + json.dumps(error).encode() + b"\n\n"
        finally:
            lease.reading = False
            await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Shielded: under a cancelled anyio scope (a server whose client left) every await
            # is cancelled again, and an unclosed connection keeps llama-server generating.
            await asyncio.shield(self._upstream.aclose())
        finally:
            self._lease.release()
