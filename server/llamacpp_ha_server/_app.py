from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamacpp_ha import Balancer, HATransport
from llamacpp_ha._routes import ROUTES

from ._auth import ApiKeyMiddleware
from ._config import ServerConfig
from ._errors import error_body, send_error
from ._metrics import ServerMetrics
from ._monitor import MonitorHistory, monitor_page
from ._proxy import ProxyEndpoint, ServerState

__all__ = ["PROXIED_PATHS", "ServerContext", "create_app"]

logger = logging.getLogger("llamacpp_ha.server")

PROXIED_PATHS = tuple(ROUTES)
"""The POST paths proxied through the engine: its one route table."""


@dataclass(frozen=True)
class ServerContext:
    """Everything one app owns; ``app.state.llamacpp_ha``."""

    config: ServerConfig
    balancer: Balancer
    state: ServerState
    metrics: ServerMetrics
    history: MonitorHistory


class _InternalErrors:
    """An unexpected error becomes one logged traceback and a 500 in OpenAI's shape, and the
    keep-alive connection stays usable. (Starlette's handler for ``Exception`` re-raises after
    answering, and uvicorn then drops the connection: the client's next request on it failed.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if started:
                raise  # the answer is half sent: closing the connection is all that is left
            await send_error(
                send, 500, "Internal error in the balancer; see its log.", "server_error", "internal_error"
            )


class _DrainUnreadBody:
    """Reads what is left of a request body before an answer that did not need it starts (a 404,
    405, 401 or 413 sent while the client is still sending).

    A server that answers and closes while the client is still sending makes the kernel reset the
    connection, and the client loses the answer with it: it sees a reset, not the error. At most
    ``limit_bytes`` are read, and for at most ``timeout_s``; a body announced larger is not read.
    """

    def __init__(self, app: ASGIApp, limit_bytes: int, timeout_s: float) -> None:
        self.app = app
        self._limit = limit_bytes
        self._timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received_all = False

        async def tracked() -> Message:
            nonlocal received_all
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                received_all = True
            return message

        async def draining(message: Message) -> None:
            nonlocal received_all
            if message["type"] == "http.response.start" and not received_all:
                received_all = True
                await self._drain(scope, receive)
            await send(message)

        await self.app(scope, tracked, draining)

    async def _drain(self, scope: Scope, receive: Receive) -> None:
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self._limit):
                return
        drained = 0
        with anyio.move_on_after(self._timeout_s):
            while drained <= self._limit:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                drained += len(message.get("body", b""))


class _ProxyDispatch:
    """Sends ``POST`` on a proxied path straight to the proxy; everything else to the app."""

    def __init__(self, app: ASGIApp, proxy: ProxyEndpoint) -> None:
        self.app = app
        self._proxy = proxy
        self._paths = frozenset(PROXIED_PATHS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self._paths:
            await self._proxy(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


def create_app(config: ServerConfig, *, upstream: httpx2.AsyncBaseTransport | None = None) -> FastAPI:
    """The OpenAI-compatible proxy over one balancer. Nothing is shared with other apps."""
    balancer = Balancer(config, poll_transport=upstream)
    transport = HATransport(balancer, upstream=upstream)
    context = ServerContext(
        config=config,
        balancer=balancer,
        state=ServerState(),
        metrics=ServerMetrics(balancer),
        history=MonitorHistory(balancer, config.server.monitor_history_s),
    )
    proxy = ProxyEndpoint(
        transport,
        context.state,
        context.metrics,
        config.server.max_body_bytes,
        config.server.body_timeout_s,
        history=context.history,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await balancer.start()
        sampler = asyncio.create_task(context.history.run(), name="llamacpp-ha-monitor-history")
        try:
            yield
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            await transport.aclose()

    app = FastAPI(title="llamacpp-ha", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llamacpp_ha = context
    app.router.routes.extend(Route(path, proxy, methods=["POST"]) for path in PROXIED_PATHS)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        if context.state.draining:
            return _json(503, {"status": "draining", "in_flight": context.state.in_flight})
        snapshot = balancer.snapshot()
        backends = snapshot.backends
        routable = [b.name for b in backends if b.routable]
        if routable:
            body: dict[str, object] = {"status": "ok", "routable": routable, "backends": len(backends)}
            if snapshot.shared is not None:
                # Redis down is not unhealthy: admission goes on locally; say so.
                shared = snapshot.shared
                body["shared"] = {"state": shared.state, "reason": shared.reason, "replicas": len(shared.replicas)}
            return _json(200, body)
        reason = "; ".join(f"{b.name}: {b.state} ({b.reason})" for b in backends)
        return _json(503, {"status": "unavailable", "reason": f"no backend is routable: {reason}"})

    @app.get("/v1/models")
    async def models() -> Response:
        return _json(200, balancer.models_payload())

    @app.get("/")
    async def root() -> Response:
        return Response(status_code=307, headers={"location": "/monitor"})

    @app.get("/monitor")
    async def monitor() -> Response:
        return Response(monitor_page(), media_type="text/html; charset=utf-8")

    @app.get("/monitor/data")
    async def monitor_data() -> Response:
        snapshot = balancer.snapshot()
        server = {
            "draining": context.state.draining,
            "in_flight": context.state.in_flight,
            "uptime_s": round(time.time() - context.state.started_at, 1),
            "keys": [key.name for key in config.server.api_keys],
        }
        payload = {
            "snapshot": snapshot.model_dump(mode="json"),
            "history": context.history.samples(),
            "latest": context.history.latest(),
            "server": server,
        }
        return _json(200, payload)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(context.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        codes = {404: ("not_found_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed")}
        error_type, code = codes.get(exc.status_code, ("invalid_request_error", "http_error"))
        message = {
            404: f"No route {request.url.path}.",
            405: f"{request.method} is not allowed on {request.url.path}.",
        }
        body = error_body(message.get(exc.status_code, str(exc.detail)), error_type, code)
        return Response(body, status_code=exc.status_code, media_type="application/json", headers=exc.headers)

    # Innermost of our middlewares: proxied requests skip FastAPI's own stack and router (a
    # profile showed them at several percent of the proxy's CPU per request).
    app.add_middleware(_ProxyDispatch, proxy=proxy)
    app.add_middleware(ApiKeyMiddleware, keys=config.server.api_keys, exempt_paths=config.server.exempt_paths)
    if config.server.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=config.server.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(_InternalErrors)  # whatever fails inside is answered here
    limit = 2 * config.server.max_body_bytes
    app.add_middleware(_DrainUnreadBody, limit_bytes=limit, timeout_s=config.server.body_timeout_s)  # outermost
    return app
