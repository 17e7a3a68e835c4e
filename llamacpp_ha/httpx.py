"""The same balancer for classic ``httpx`` (openai 1.x/2.x, LangChain, LlamaIndex).

``pip install "llamacpp-ha[httpx]"``.

``ha_client(cfg)`` returns an ``httpx.AsyncClient`` and ``ha_sync_client(cfg)`` an ``httpx.Client``.
Backends are called through classic httpx too, so respx mocks of the backends apply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import httpx2

from ._balancer import Balancer
from ._client import BalancedClient, client_defaults, load_config
from ._config import BalancerConfig
from ._convert import Httpx2FromHttpx, to_httpx2_request, to_httpx_error, to_httpx_response
from ._sync import SyncHATransport
from ._transport import HATransport

__all__ = ["HttpxAsyncClient", "HttpxSyncClient", "HttpxSyncTransport", "HttpxTransport", "ha_client", "ha_sync_client"]


def _backend_transport(upstream: httpx.AsyncBaseTransport | None) -> httpx2.AsyncBaseTransport:
    """Backends are called through classic httpx here, so respx mocks of them apply."""
    if upstream is None:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=4.0)
        upstream = httpx.AsyncHTTPTransport(limits=limits)
    return Httpx2FromHttpx(upstream)


class HttpxTransport(httpx.AsyncBaseTransport):
    """:class:`~llamacpp_ha.HATransport` as a classic ``httpx.AsyncBaseTransport``."""

    def __init__(self, config: BalancerConfig, *, upstream: httpx.AsyncBaseTransport | None = None) -> None:
        self._transport = HATransport(config, upstream=_backend_transport(upstream))

    @property
    def balancer(self) -> Balancer:
        return self._transport.balancer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        try:
            response = await self._transport.handle_async_request(to_httpx2_request(request, body))
        except httpx2.HTTPError as exc:
            raise to_httpx_error(exc, request) from exc
        return to_httpx_response(response, request)

    async def aclose(self) -> None:
        await self._transport.aclose()


class HttpxSyncTransport(httpx.BaseTransport):
    """The balancer as a classic blocking ``httpx.BaseTransport`` (the engine runs on a private loop)."""

    def __init__(self, config: BalancerConfig, *, upstream: httpx.AsyncBaseTransport | None = None) -> None:
        self._transport = SyncHATransport(config, upstream=_backend_transport(upstream))

    @property
    def balancer(self) -> Balancer:
        return self._transport.balancer

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        try:
            response = self._transport.handle_request(to_httpx2_request(request, body))
        except httpx2.HTTPError as exc:
            raise to_httpx_error(exc, request) from exc
        return to_httpx_response(response, request, stream=_SyncStream(response, request))

    def close(self) -> None:
        self._transport.close()


class _SyncStream(httpx.SyncByteStream):
    def __init__(self, response: httpx2.Response, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    def __iter__(self) -> Any:
        try:
            yield from self._response.iter_raw()
        except httpx2.HTTPError as exc:
            raise to_httpx_error(exc, self._request) from exc

    def close(self) -> None:
        self._response.close()


class HttpxAsyncClient(BalancedClient, httpx.AsyncClient):
    """An ``httpx.AsyncClient`` whose requests are balanced over a llama.cpp fleet."""

    def __init__(self, config: BalancerConfig, **kwargs: Any) -> None:
        self._ha_transport = HttpxTransport(config)
        super().__init__(transport=self._ha_transport, **client_defaults(config, kwargs))


class HttpxSyncClient(BalancedClient, httpx.Client):
    """An ``httpx.Client`` whose requests are balanced over a llama.cpp fleet."""

    def __init__(self, config: BalancerConfig, **kwargs: Any) -> None:
        self._ha_transport = HttpxSyncTransport(config)
        super().__init__(transport=self._ha_transport, **client_defaults(config, kwargs))


def ha_client(config: BalancerConfig | str | Path, **kwargs: Any) -> HttpxAsyncClient:
    """Like :func:`llamacpp_ha.ha_client`, as a classic ``httpx.AsyncClient``."""
    return HttpxAsyncClient(load_config(config), **kwargs)


def ha_sync_client(config: BalancerConfig | str | Path, **kwargs: Any) -> HttpxSyncClient:
    """Like :func:`llamacpp_ha.ha_sync_client`, as a classic ``httpx.Client``."""
    return HttpxSyncClient(load_config(config), **kwargs)
