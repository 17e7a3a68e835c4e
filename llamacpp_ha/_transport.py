from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx2

from ._backend import Backend, BackendState
from ._balancer import Balancer
from ._config import BalancerConfig
from ._errors import BadRequestError, BalancerError, NoBackendError, UpstreamTimeoutError
from ._headers import CREDENTIAL_HEADERS, HOP_BY_HOP
from ._leases import Lease
from ._request import check_json_body, parse_request
from ._routes import Route, route_for
from ._stream import LeasedStream

__all__ = ["HATransport", "RouteInfo"]

logger = logging.getLogger("llamacpp_ha")

BACKEND_HEADER = "x-llamacpp-ha-backend"
_MODEL_PATHS = frozenset({"/v1/models", "/models"})
# Plus X-Conversation-Id: with it llama-server keeps generating after the client left (a
# resumable stream), which would hold a slot we believe is free.
# Content-Length too: the body sent may be rewritten (``id_slot`` stripped); httpx2 sets it anew.
_DROPPED_HEADERS = HOP_BY_HOP | {b"host", b"x-conversation-id", b"content-length"}
_STALE_RETRIES = 4
_RETRYABLE = (httpx2.NetworkError, httpx2.RemoteProtocolError, httpx2.ConnectTimeout)


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """How a request was routed: ``response.extensions["llamacpp_ha"]``."""

    backend: str
    queued_s: float
    """Time spent waiting for a slot, over all attempts."""
    attempts: int
    """Backends tried; more than 1 when earlier ones failed before answering."""
    affinity: str | None
    """``hit``, ``miss`` (the conversation's backend was full) or ``new``; None without a key."""
    model: str | None
    """The model the request asked for."""
    expected_cached_tokens: float = 0.0
    """Prompt tokens the prefix index expected the backend to have cached."""
    predicted_ttft_s: float = 0.0
    """Predicted time from dispatch to the first token on this backend."""


class HATransport(httpx2.AsyncBaseTransport):
    """An httpx2 transport that sends each request to a llama-server chosen by a :class:`Balancer`.

    Scheme, host and port of the request URL are replaced by the chosen backend's; path and
    query are kept. ``GET /v1/models`` is answered from the registry.
    """

    def __init__(self, config: BalancerConfig | Balancer, *, upstream: httpx2.AsyncBaseTransport | None = None) -> None:
        self.balancer = config if isinstance(config, Balancer) else Balancer(config, poll_transport=upstream)
        self._upstream = upstream or httpx2.AsyncHTTPTransport(
            # Below llama-server's 5 s keep-alive, so we rarely reuse a connection it is closing.
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=4.0)
        )
        self._turn = 0

    async def aclose(self) -> None:
        await self.balancer.aclose()
        await self._upstream.aclose()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        route = route_for(request.method, path)
        try:
            if route is not None and route.takes_slot:
                return await self._forward_leased(request, route)
            if route is not None:
                try:
                    check_json_body(await request.aread())
                except BadRequestError:
                    self.balancer.stats.bad_requests += 1
                    raise
            if request.method == "GET" and path in _MODEL_PATHS:
                if not self.balancer.model_ids():
                    await self.balancer.start()
                return _json_response(200, self.balancer.models_payload())
            return await self._forward_any(request)
        except BalancerError as error:
            return httpx2.Response(error.status_code, headers=error.headers(), content=error.body_bytes())

    async def _forward_leased(self, request: httpx2.Request, route: Route) -> httpx2.Response:
        balancer = self.balancer
        config = balancer.config
        body = await request.aread()
        try:
            facts = parse_request(route, request.headers.get, body, config.prefix_block_bytes, config.prefix_max_blocks)
        except BalancerError:
            balancer.stats.bad_requests += 1
            raise
        balancer.stats.requests += 1
        if facts.body is not None:
            body = facts.body
        excluded: set[str] = set()
        # A retried request keeps its place in the queue and its original deadline.
        seq = balancer.queue.next_seq()
        deadline = time.monotonic() + config.queue_timeout_s
        queued_s = 0.0
        failures: list[str] = []
        for attempt in range(1, config.max_attempts + 1):
            started = time.monotonic()
            lease = await balancer.acquire(facts, excluded=frozenset(excluded), seq=seq, deadline=deadline)
            queued_s += time.monotonic() - started
            backend = lease.backend
            try:
                response = await self._send(request, backend, body, close=facts.stream)
                # Inside the guarded block: a failed or cancelled body read gives the slot back too.
                loading = response.status_code == 503 and await _is_loading(response)
            except httpx2.ReadTimeout:
                # It took the request and went silent: it may still be working on it, so no retry,
                # and its slot counts as busy until a poll says otherwise.
                lease.release()
                backend.external += 1
                backend.errors += 1
                raise UpstreamTimeoutError(
                    f"The backend {backend.name} accepted the request and sent nothing for "
                    f"{self._read_timeout_s(request):g} s."
                ) from None
            except Exception as exc:
                # Whatever failed, nothing reached the caller yet: another backend may serve it.
                # (Classified by where it happened, not by type: under backend kills the HTTP
                # stack has surfaced errors outside httpx's own hierarchy.)
                lease.release()
                self._note_failure(backend, exc)
                failures.append(f"{backend.name}: {type(exc).__name__}")
                if not isinstance(exc, _RETRYABLE):
                    logger.warning("sending to %s failed unexpectedly; trying another backend", backend.name,
                                   exc_info=exc)  # fmt: skip
            except BaseException:
                lease.release()
                if not facts.stream:
                    # llama-server notices a vanished non-stream client late or never (it checks
                    # only after 1 s without results on the whole server): count the slot as
                    # busy until the next /slots poll says otherwise.
                    backend.external += 1
                raise
            else:
                if loading:
                    lease.release()
                    backend.set_state(BackendState.LOADING, "answered 503 Loading model")
                    failures.append(f"{backend.name}: loading")
                else:
                    info = RouteInfo(
                        backend.name,
                        queued_s,
                        attempt,
                        lease.affinity,
                        facts.model,
                        lease.expected_cached_tokens,
                        lease.predicted_prefill_s,
                    )
                    return self._leased_response(response, lease, info)
            excluded.add(backend.name)
            if attempt == config.max_attempts or not balancer.could_serve(facts.model, excluded):
                break
            balancer.stats.retries += 1
        balancer.stats.failovers_exhausted += 1
        raise NoBackendError(f"Every attempt failed before the backend answered: {'; '.join(failures)}.")

    def _leased_response(self, upstream: httpx2.Response, lease: Lease, info: RouteInfo) -> httpx2.Response:
        sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
        stream = LeasedStream(upstream, lease, sse=sse, on_failure=self._note_stream_failure)
        headers = upstream.headers.copy()
        headers[BACKEND_HEADER] = info.backend
        if upstream.status_code >= 500:
            lease.backend.errors += 1
        return httpx2.Response(
            upstream.status_code,
            headers=headers,
            stream=stream,
            extensions={**upstream.extensions, "llamacpp_ha": info},
        )

    async def _forward_any(self, request: httpx2.Request) -> httpx2.Response:
        """Requests that take no slot (tokenize, props, health...) go to any routable backend."""
        body = await request.aread()
        await self.balancer.start()
        failures: list[str] = []
        for _ in range(self.balancer.config.max_attempts):
            routable = [b for b in self.balancer.backends if b.routable and b.name not in failures]
            if not routable:
                break
            self._turn += 1
            backend = routable[self._turn % len(routable)]
            try:
                response = await self._send(request, backend, body)
            except _RETRYABLE as exc:
                self._note_failure(backend, exc)
                failures.append(backend.name)
                continue
            response.headers[BACKEND_HEADER] = backend.name
            return response
        raise NoBackendError("No backend is available." + (f" Failed: {', '.join(failures)}." if failures else ""))

    async def _send(
        self, request: httpx2.Request, backend: Backend, body: bytes, *, close: bool = False
    ) -> httpx2.Response:
        # llama-server closes the connection after every stream though it says keep-alive, so a
        # streamed request asks for that (``close``): its connection never returns to the pool.
        # A kept-alive connection can still expire on the server (5 s idle) just as it is reused,
        # failing before the request reached it: try a few, then count it against the backend.
        for _ in range(_STALE_RETRIES):
            try:
                return await self._upstream.handle_async_request(self._upstream_request(request, backend, body, close))
            except (httpx2.RemoteProtocolError, httpx2.ReadError):
                continue
        return await self._upstream.handle_async_request(self._upstream_request(request, backend, body, close))

    def _upstream_request(self, request: httpx2.Request, backend: Backend, body: bytes, close: bool) -> httpx2.Request:
        base = backend.base_url
        url = request.url.copy_with(
            scheme=base.scheme,
            host=base.host,
            port=base.port,
            raw_path=base.raw_path.rstrip(b"/") + request.url.raw_path,
        )
        # Raw bytes: a header value that is not ASCII (``X-Title: café``) is forwarded as sent.
        dropped = _DROPPED_HEADERS | CREDENTIAL_HEADERS if backend.auth_headers else _DROPPED_HEADERS
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in dropped]
        headers += [(k.encode(), v.encode()) for k, v in backend.auth_headers.items()]
        if close:
            headers.append((b"Connection", b"close"))
        extensions = dict(request.extensions)
        timeout = dict(extensions.get("timeout") or {})
        timeout["connect"] = self.balancer.config.connect_timeout_s
        timeout["read"] = self._read_timeout_s(request)
        extensions["timeout"] = timeout
        return httpx2.Request(request.method, url, headers=headers, content=body, extensions=extensions)

    def _read_timeout_s(self, request: httpx2.Request) -> float:
        """``read_timeout_s``, or the caller's own read timeout when that is shorter."""
        read = (request.extensions.get("timeout") or {}).get("read")
        limit = self.balancer.config.read_timeout_s
        return min(float(read), limit) if read is not None else limit

    def _note_failure(self, backend: Backend, exc: Exception) -> None:
        backend.errors += 1
        if isinstance(exc, (httpx2.ConnectError, httpx2.ConnectTimeout)):
            backend.set_state(BackendState.DEAD, f"{type(exc).__name__}: {exc}".rstrip(": "))
        self.balancer.wake_poller(backend)

    def _note_stream_failure(self, lease: Lease, exc: Exception) -> None:
        self.balancer.stats.stream_failures += 1
        self._note_failure(lease.backend, exc)


async def _is_loading(response: httpx2.Response) -> bool:
    """True for llama-server's 503 ``Loading model``. Reads the (small) body either way."""
    try:
        if response.is_stream_consumed:  # a response built from bytes (a mock transport)
            raw = response.content
        else:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
    finally:
        await response.aclose()
    # The body was consumed: give the response a fresh stream of the same bytes.
    response.stream = httpx2.ByteStream(raw)
    return b"Loading model" in raw


def _json_response(status: int, body: Any) -> httpx2.Response:
    return httpx2.Response(status, headers={"content-type": "application/json"}, content=json.dumps(body).encode())
