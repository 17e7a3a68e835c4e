"""The balancer's background task: polls backends on their interval and closes abandoned responses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ._leases import Lease
from ._stats import Stats

if TYPE_CHECKING:
    from ._balancer import Balancer

__all__ = ["Poller", "expire_idle_leases"]

logger = logging.getLogger("llamacpp_ha")


class Poller:
    """Runs one task per balancer that starts each backend's poll every ``poll_interval_s`` (a
    router's models are polled with it), or at once when :meth:`wake` asks, and closes the
    responses nobody read for ``stream_idle_timeout_s``."""

    def __init__(self, balancer: Balancer) -> None:
        # Held weakly: a balancer dropped without aclose() is collected and the task ends,
        # instead of running until the loop closes.
        self._balancer = weakref.ref(balancer)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._soon: set[str] = set()
        """Backends to poll at once, out of their schedule."""

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="llamacpp-ha-poller")

    def wake(self, backend_name: str) -> None:
        """Poll this backend now instead of at its next interval; no other."""
        self._soon.add(backend_name)
        self._wake.set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        # Each backend has at most one poll on the wire, started every interval once the previous
        # one finished: a backend that hangs until the poll timeout delays no other backend.
        # The balancer is held only while starting polls (see __init__).
        polls: dict[str, asyncio.Task[None]] = {}
        started: dict[str, float] = {}
        try:
            while True:
                balancer = self._balancer()
                if balancer is None or balancer.closed:
                    return
                interval = balancer.config.poll_interval_s
                now = time.monotonic()
                soon, self._soon = self._soon, set()
                for backend in balancer.backends:
                    if backend.router is not None:
                        continue  # polled with its router
                    name = backend.name
                    running = polls.get(name)
                    due = now - started.get(name, -interval) >= interval or name in soon
                    if due and (running is None or running.done()):
                        started[name] = now
                        polls[name] = asyncio.create_task(
                            balancer.poll_backend(backend), name=f"llamacpp-ha-poll-{name}"
                        )
                try:
                    await expire_idle_leases(
                        balancer.scheduler.leases, balancer.stats, balancer.config.stream_idle_timeout_s
                    )
                except Exception:
                    logger.exception("closing idle responses failed")
                next_due = min(started.values(), default=now) + interval
                del balancer
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.01, next_due - time.monotonic())):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            for task in polls.values():
                task.cancel()
            await asyncio.gather(*polls.values(), return_exceptions=True)


async def expire_idle_leases(leases: Iterable[Lease], stats: Stats, limit_s: float) -> None:
    """Close the responses nobody read for ``limit_s`` and give their slots back."""
    now = time.monotonic()
    for lease in [lease for lease in leases if lease.idle_for(now) > limit_s]:
        logger.warning("closing a response from %s that nobody read for %.0f s", lease.backend.name, limit_s)
        stats.expired_leases += 1
        try:
            if lease.closer is not None:
                await lease.closer()
        finally:
            lease.release()
