from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import anyio
import httpx2

from ._leases import Lease, Timings

__all__ = ["LeasedStream"]

_TAIL_BYTES = 4096
"""llama-server's ``timings`` sit in the last event (or at the end of a JSON body)."""
_IDLE_CUT = "The response was closed after nobody read it for the idle deadline (stream_idle_timeout_s)."


class LeasedStream(httpx2.AsyncByteStream):
    """A backend's response body that gives its slot back exactly once, when it is finished.

    Finished means: the last byte was read, the consumer closed the response, the backend
    failed, or the consumer stopped reading for longer than the idle deadline (the
    balancer's poller then calls :meth:`aclose` through ``lease.closer``).

    An SSE body is forwarded event by event, never half an event, so that a backend failing
    mid-stream can be reported with a well-formed error event. The tail of the body is kept
    to read the backend's ``timings`` once it is finished.
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
        self._expired = False
        self._tail = b""
        self._chunks: AsyncIterator[bytes] | None = None
        lease.answered(self.expire)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        lease = self._lease
        if self._closed:
            raise httpx2.StreamClosed()
        upstream = self._upstream.stream
        assert isinstance(upstream, httpx2.AsyncByteStream)
        self._chunks = chunks = upstream.__aiter__()
        pending = b""
        try:
            lease.reading()
            async for chunk in chunks:
                lease.touch()
                if self._sse:
                    data = pending + chunk if pending else chunk
                    cut = data.rfind(b"\n\n")
                    if cut < 0:
                        pending = data  # half an event: still the backend's turn
                        continue
                    chunk, pending = data[: cut + 2], data[cut + 2 :]
                self._keep_tail(chunk)
                lease.delivered()
                yield chunk
                if self._expired:
                    # Cut by the idle deadline while the consumer was away: tell it, in the stream.
                    if self._sse:
                        yield _error_event(_IDLE_CUT, "stream_idle_timeout")
                        return
                    raise httpx2.ReadError(_IDLE_CUT)
                lease.reading()
            if pending:
                self._keep_tail(pending)
                yield pending
            lease.timings = Timings.find(self._tail)
        except httpx2.TransportError as exc:
            if self._closed:
                raise
            self._on_failure(lease, exc)
            if not self._sse:
                raise
            # The caller already has a 200 and whole events: drop the half-received one and end
            # the way llama-server ends a stream that fails, so SDKs raise a clean API error.
            message = f"The backend {lease.backend.name} failed during the response: {type(exc).__name__}"
            yield _error_event(message, "backend_failed")
        finally:
            await self.aclose()

    def _keep_tail(self, chunk: bytes) -> None:
        tail = self._tail + chunk if len(chunk) < _TAIL_BYTES else chunk
        self._tail = tail[-_TAIL_BYTES:]

    @property
    def timings(self) -> Timings | None:
        """What the backend reported of its prompt processing, once the body is finished."""
        return self._lease.timings

    @property
    def ttft_s(self) -> float | None:
        """From dispatch to the backend's first body bytes."""
        first = self._lease.first_byte_at
        return None if first is None else first - self._lease.acquired_at

    async def expire(self) -> None:
        """Close it because the consumer stopped reading (the idle deadline): the slot goes back now,
        and a consumer that comes back gets an error event, not a bare end of stream."""
        self._expired = True
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Shielded: under a cancelled anyio scope (a server whose client left) every await
            # is cancelled again, and an unclosed connection keeps llama-server generating.
            with anyio.CancelScope(shield=True):
                await self._upstream.aclose()
                if isinstance(self._chunks, AsyncGenerator):
                    # Closed now, not when collected: Trio warns of async generators left to the GC.
                    await self._chunks.aclose()
        finally:
            self._lease.release()


def _error_event(message: str, code: str) -> bytes:
    """An SSE event the way llama-server ends a stream that fails; SDKs raise an API error for it."""
    error = {"error": {"message": message, "type": "server_error", "code": code}}
    return b"data: " + json.dumps(error).encode() + b"\n\n"
