from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
from starlette.types import Message, Receive, Scope, Send

from llamacpp_ha import HATransport, RouteInfo
from llamacpp_ha._headers import CREDENTIAL_HEADERS, HOP_BY_HOP

from ._auth import key_name
from ._errors import send_error
from ._metrics import ServerMetrics
from ._monitor import MonitorHistory

__all__ = ["ProxyEndpoint", "ServerState"]

access_log = logging.getLogger("llamacpp_ha.access")

# The proxy's own key must not reach a backend (each backend's key comes from the config).
# The proxy's own key never reaches a backend (a backend's key is added by the engine).
_DROPPED_REQUEST_HEADERS = HOP_BY_HOP | CREDENTIAL_HEADERS | {b"host"}
# uvicorn writes its own framing, Server and Date; CORS is the server's to answer.
_DROPPED_RESPONSE_HEADERS = frozenset(
    {header.decode() for header in HOP_BY_HOP} | {"server", "date", "access-control-allow-origin"}
)


@dataclass
class ServerState:
    """Per-app state the proxy and the lifecycle share."""

    draining: bool = False
    in_flight: int = 0
    """Proxied requests accepted and not yet finished (queued, waiting or streaming)."""
    started_at: float = field(default_factory=time.time)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no proxied request is in flight."""
        if self.in_flight:
            await self._idle.wait()


class _BodyTooLarge(Exception):
    pass


class ProxyEndpoint:
    """Forwards one request through the engine's transport and streams the answer back as it comes.

    The client's disconnect is watched from the moment the body is read: a client that leaves
    while queued leaves the queue, one that leaves mid-stream closes the backend connection (so
    llama-server stops generating), and either way the slot is given back.
    """

    def __init__(
        self,
        transport: HATransport,
        state: ServerState,
        metrics: ServerMetrics,
        max_body_bytes: int,
        body_timeout_s: float = 30.0,
        history: MonitorHistory | None = None,
    ) -> None:
        self._transport = transport
        self._state = state
        self._metrics = metrics
        self._history = history
        self._max_body = max_body_bytes
        self._body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._state.draining:
            await send_error(send, 503, "The server is shutting down.", "unavailable_error", "draining", retry=True)
            return
        try:
            body = await self._read_body(scope, receive)
        except _BodyTooLarge:
            message = f"The request body is larger than {self._max_body} bytes."
            await send_error(send, 413, message, "invalid_request_error", "request_too_large")
            return
        except TimeoutError:
            message = f"The request body stopped arriving for {self._body_timeout_s:g} s."
            await send_error(send, 408, message, "invalid_request_error", "request_timeout")
            return
        if body is None:
            return  # the client left while sending
        self._state.enter()
        try:
            await self._forward(scope, receive, send, body)
        finally:
            self._state.leave()

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        for header, value in scope["headers"]:
            if header == b"content-length" and value.isdigit() and int(value) > self._max_body:
                raise _BodyTooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            with anyio.fail_after(self._body_timeout_s):
                message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_body:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
        started = time.perf_counter()
        request = httpx2.Request(
            scope["method"],
            httpx2.URL(scheme="http", host="llamacpp-ha", path=scope["path"], query=scope["query_string"]),
            headers=[(k, v) for k, v in scope["headers"] if k not in _DROPPED_REQUEST_HEADERS],
            content=body,
        )
        status = 0
        info: RouteInfo | None = None
        completed = anyio.Event()
        with anyio.CancelScope() as cancel_on_disconnect:
            async with anyio.create_task_group() as watchers:
                watchers.start_soon(_cancel_on_disconnect, receive, cancel_on_disconnect, completed)
                response = await self._transport.handle_async_request(request)
                try:
                    status = response.status_code
                    info = response.extensions.get("llamacpp_ha")
                    headers = [
                        (k.encode("latin-1"), v.encode("latin-1"))
                        for k, v in response.headers.multi_items()
                        if k not in _DROPPED_RESPONSE_HEADERS
                    ]
                    await send({"type": "http.response.start", "status": status, "headers": headers})
                    first = True
                    stream = response.stream
                    assert isinstance(stream, httpx2.AsyncByteStream)
                    async for chunk in stream:
                        if first:
                            self._metrics.time_to_first_byte.observe(time.perf_counter() - started)
                            first = False
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    # uvicorn reports http.disconnect once the response is complete: not a client leaving.
                    completed.set()
                    self._finished(scope, status, info, stream, started)
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                finally:
                    await response.aclose()
                watchers.cancel_scope.cancel()
        if cancel_on_disconnect.cancelled_caught and not completed.is_set():
            # 499 is nginx's "client closed request", for the metrics and the log only.
            self._finished(scope, 499, info, None, started)

    def _finished(self, scope: Scope, status: int, info: RouteInfo | None, stream: object, started: float) -> None:
        self._metrics.observe_request(info, status, key_name(scope))
        record = _access_record(scope, status, info, stream, started)
        if self._history is not None:
            self._history.record(record)
        if access_log.isEnabledFor(logging.INFO):
            text = " ".join(f"{k}={'-' if v is None else v}" for k, v in record.items())
            access_log.info(text, extra=record)


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope, completed: anyio.Event) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            if not completed.is_set():
                scope.cancel()
            return


def _access_record(scope: Scope, status: int, info: RouteInfo | None, stream: object, started: float) -> dict[str, Any]:
    """What was asked, where it went, how long it took, what was cached: for the log and the monitor."""
    timings = getattr(stream, "timings", None)
    fields = {
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "model": info.model if info else None,
        "backend": info.backend if info else None,
        "queued_ms": round(info.queued_s * 1000) if info else None,
        "ttft_ms": round(ttft * 1000) if (ttft := getattr(stream, "ttft_s", None)) is not None else None,
        "total_ms": round((time.perf_counter() - started) * 1000),
        "prompt_tokens": timings.cache_n + timings.prompt_n if timings else None,
        "cached_tokens": timings.cache_n if timings else None,
        "output_tokens": timings.predicted_n if timings else None,
        "affinity": info.affinity if info else None,
        "attempts": info.attempts if info else None,
        "key": key_name(scope),
    }
    return fields
