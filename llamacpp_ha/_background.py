"""Work that outlives the request that started it, under asyncio and Trio alike."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

import anyio
import anyio.lowlevel
import sniffio

__all__ = ["Alarm", "BackgroundTask"]

logger = logging.getLogger("llamacpp_ha")


class BackgroundTask:
    """Runs one coroutine function in a task of its own, outside any caller's task group.

    ``AsyncOpenAI(http_client=ha_client(cfg))`` gives the engine no task group to live in, and
    Trio has no detached tasks: there it runs as a system task (cancelled when ``trio.run`` ends),
    under asyncio as a plain task. Either way it runs in a cancel scope that :meth:`aclose` cancels
    and then waits for.
    """

    def __init__(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self._run = run
        self._scope: anyio.CancelScope | None = None
        self._finished: anyio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        """Held so that asyncio, which keeps only weak references to tasks, does not collect it."""

    @property
    def running(self) -> bool:
        return self._finished is not None and not self._finished.is_set()

    def start(self) -> None:
        """Start it in the running event loop unless it runs already."""
        if self.running:
            return
        self._scope = anyio.CancelScope()
        self._finished = anyio.Event()
        if sniffio.current_async_library() == "trio":
            import trio

            trio.lowlevel.spawn_system_task(self._host, name=self.name)
        else:
            self._task = asyncio.get_running_loop().create_task(self._host(), name=self.name)

    async def _host(self) -> None:
        scope, finished = self._scope, self._finished
        assert scope is not None
        assert finished is not None
        try:
            with scope:
                await self._run()
        except Exception:
            # A Trio system task that raises crashes the whole run: log it and end instead.
            logger.exception("the background task %s failed", self.name)
        finally:
            finished.set()
            self._task = None

    async def aclose(self) -> None:
        """Cancel it and wait until it has finished. Idempotent."""
        if self._scope is None or self._finished is None:
            return
        self._scope.cancel()
        await self._finished.wait()


class Alarm:
    """Calls ``callback`` once the time last asked for (``time.monotonic``) has come.

    Trio has no ``call_later``: :meth:`run` is a loop for a background task. :meth:`set` may be
    called from synchronous code at any time, also before the loop runs; the callback may set the
    alarm again.
    """

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self._at = math.inf
        self._changed: anyio.Event | None = None

    @property
    def at(self) -> float:
        return self._at

    def set(self, at: float) -> None:
        self._at = at
        if self._changed is not None:
            self._changed.set()

    def cancel(self) -> None:
        self._at = math.inf

    async def run(self) -> None:
        while True:
            self._changed = anyio.Event()
            delay = self._at - time.monotonic()
            if delay <= 0:
                self._at = math.inf
                self._callback()
                await anyio.lowlevel.checkpoint()  # a callback that keeps setting a past time must not starve the loop
                continue
            with anyio.move_on_after(delay):
                await self._changed.wait()
