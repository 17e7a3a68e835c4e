from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx2
from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._balancer import Balancer
from ._client import BalancedClient, client_defaults, load_config
from ._config import BalancerConfig
from ._transport import HATransport

__all__ = ["HASyncClient", "SyncHATransport", "ha_sync_client"]

T = TypeVar("T")


class SyncHATransport(httpx2.BaseTransport):
    """The async engine behind a blocking transport, for ``OpenAI(http_client=...)``.

    The engine runs on a private event loop in a daemon thread (an anyio blocking portal), so it
    works in a plain script, inside a running event loop and in a Jupyter kernel alike, and an
    interpreter exiting without ``close()`` does not hang: a finalizer stops the engine.
    """

    def __init__(self, config: BalancerConfig, *, upstream: httpx2.AsyncBaseTransport | None = None) -> None:
        stack = contextlib.ExitStack()
        self._portal: BlockingPortal = stack.enter_context(start_blocking_portal(name="llamacpp-ha-engine"))
        self._transport: HATransport = self._portal.call(lambda: HATransport(config, upstream=upstream))
        self._finalizer = weakref.finalize(self, _shutdown, self._portal, self._transport, stack)

    @property
    def balancer(self) -> Balancer:
        return self._transport.balancer

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        if not self._finalizer.alive:
            raise RuntimeError("the client is closed")
        body = request.read()
        async_request = httpx2.Request(
            request.method, request.url, headers=request.headers, content=body, extensions=request.extensions
        )
        response = _call(self._portal, self._transport.handle_async_request, async_request)
        return httpx2.Response(
            response.status_code,
            headers=response.headers,
            stream=_BlockingStream(self._portal, response),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._finalizer()


def _shutdown(portal: BlockingPortal, transport: HATransport, stack: contextlib.ExitStack) -> None:
    with contextlib.suppress(Exception):
        portal.call(transport.aclose)
    stack.close()


class _BlockingStream(httpx2.SyncByteStream):
    """An async response body read chunk by chunk through the portal; closing it gives the slot back."""

    def __init__(self, portal: BlockingPortal, response: httpx2.Response) -> None:
        self._portal = portal
        self._response = response

    def __iter__(self) -> Iterator[bytes]:
        stream = self._response.stream
        assert isinstance(stream, httpx2.AsyncByteStream)
        chunks = stream.__aiter__()
        while True:
            try:
                yield _call(self._portal, _next, chunks)
            except StopAsyncIteration:
                return

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # the portal is already gone
            self._portal.call(self._response.aclose)


def _call(portal: BlockingPortal, func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``portal.call``, except that an interrupt of the waiting thread (Ctrl-C) cancels the work.

    With ``portal.call`` a KeyboardInterrupt abandons only the wait: the request stays queued, then
    holds a slot that nobody reads. Here the task is cancelled (leaving the queue, or closing the
    backend connection), and a response that arrived in the same instant is closed.
    """
    future = portal.start_task_soon(func, *args)
    try:
        return future.result()
    except BaseException:
        if not future.cancel() and future.done() and not future.cancelled() and future.exception() is None:
            result = future.result()
            if isinstance(result, httpx2.Response):
                with contextlib.suppress(Exception):
                    portal.call(result.aclose)
        raise


async def _next(chunks: AsyncIterator[bytes]) -> bytes:
    return await chunks.__anext__()


class HASyncClient(BalancedClient, httpx2.Client):
    """An ``httpx2.Client`` whose requests are balanced over a llama.cpp fleet."""

    def __init__(self, config: BalancerConfig, **kwargs: Any) -> None:
        self._ha_transport = SyncHATransport(config)
        super().__init__(transport=self._ha_transport, **client_defaults(config, kwargs))


def ha_sync_client(config: BalancerConfig | str | Path, **kwargs: Any) -> HASyncClient:
    """A blocking ``httpx2.Client`` that balances over the configured llama-servers, for ``OpenAI(http_client=...)``.

    Closing it (``client.close()``) stops the engine; so does garbage collection or interpreter exit.
    """
    return HASyncClient(load_config(config), **kwargs)
