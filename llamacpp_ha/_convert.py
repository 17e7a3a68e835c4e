"""Conversions between classic httpx and httpx2 objects, so one engine serves both libraries.

The engine speaks httpx2. A classic-httpx face converts the caller's requests and responses at
the outside, and can forward to backends through a classic httpx transport at the inside, so
tools that intercept httpx (respx) see the backend traffic. Exceptions are mapped by name: the
two libraries share one exception hierarchy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar

import httpx
import httpx2

__all__ = ["Httpx2FromHttpx", "to_httpx2_error", "to_httpx_error", "to_httpx_response"]

_E = TypeVar("_E", bound=Exception)


def _map_error(exc: Exception, module: object, base: type[_E], request: object) -> _E:
    kind: Any = getattr(module, type(exc).__name__, None)
    if not (isinstance(kind, type) and issubclass(kind, base)):
        kind = getattr(module, "TransportError")  # noqa: B009 - the same name in both modules
    try:
        mapped = kind(str(exc), request=request)
    except TypeError:
        mapped = kind(str(exc))
    assert isinstance(mapped, base)
    return mapped


def to_httpx_error(exc: httpx2.HTTPError, request: httpx.Request) -> httpx.HTTPError:
    return _map_error(exc, httpx, httpx.HTTPError, request)


def to_httpx2_error(exc: httpx.HTTPError, request: httpx2.Request) -> httpx2.HTTPError:
    return _map_error(exc, httpx2, httpx2.HTTPError, request)


class _HttpxStreamOfHttpx2(httpx.AsyncByteStream):
    """An httpx2 response body, as a classic httpx stream."""

    def __init__(self, response: httpx2.Response, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        stream = self._response.stream
        assert isinstance(stream, httpx2.AsyncByteStream)
        try:
            async for chunk in stream:
                yield chunk
        except httpx2.HTTPError as exc:
            raise to_httpx_error(exc, self._request) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class _Httpx2StreamOfHttpx(httpx2.AsyncByteStream):
    """A classic httpx response body, as an httpx2 stream."""

    def __init__(self, response: httpx.Response, request: httpx2.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        stream = self._response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        try:
            async for chunk in stream:
                yield chunk
        except httpx.HTTPError as exc:
            raise to_httpx2_error(exc, self._request) from exc

    async def aclose(self) -> None:
        await self._response.aclose()


def to_httpx_response(
    response: httpx2.Response,
    request: httpx.Request,
    stream: httpx.SyncByteStream | httpx.AsyncByteStream | None = None,
) -> httpx.Response:
    """An httpx2 response as a classic one; ``stream`` replaces the async body adapter (sync callers)."""
    return httpx.Response(
        response.status_code,
        headers=response.headers.raw,
        stream=stream or _HttpxStreamOfHttpx2(response, request),
        extensions=response.extensions,
        request=request,
    )


def to_httpx2_request(request: httpx.Request, body: bytes) -> httpx2.Request:
    return httpx2.Request(
        request.method, str(request.url), headers=request.headers.raw, content=body, extensions=request.extensions
    )


class Httpx2FromHttpx(httpx2.AsyncBaseTransport):
    """A classic ``httpx.AsyncBaseTransport`` seen as an httpx2 transport (for forwarding to backends)."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self._transport = transport

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        body = await request.aread()
        classic = httpx.Request(
            request.method, str(request.url), headers=request.headers.raw, content=body, extensions=request.extensions
        )
        try:
            response = await self._transport.handle_async_request(classic)
        except httpx.HTTPError as exc:
            raise to_httpx2_error(exc, request) from exc
        return httpx2.Response(
            response.status_code,
            headers=response.headers.raw,
            stream=_Httpx2StreamOfHttpx(response, request),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._transport.aclose()
