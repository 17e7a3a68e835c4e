"""The balancer's background task: polls backends on their interval and closes abandoned responses."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ._background import Alarm, BackgroundTask
from ._leases import Lease
from ._stats import Stats

if TYPE_CHECKING:
    from ._backend import Backend
    from ._balancer import Balancer

__all__ = ["Poller", "expire_idle_leases"]

logger = logging.getLogger("llamacpp_ha")


class Poller:
    """Runs one background task per balancer that starts each backend's poll every
    ``poll_interval_s`` (a router's models are polled with it), or at once when :meth:`wake` asks,
    closes the responses nobody read for ``stream_idle_timeout_s``, and runs the scheduler's alarm."""

    def __init__(self, balancer: Balancer, alarm: Alarm) -> None:
        # Held weakly: a balancer dropped without aclose() is collected and the task ends,
        # instead of running until the loop closes.
        self._balancer = weakref.ref(balancer)
        self._alarm = alarm
        self._task = BackgroundTask("llamacpp-ha-poller", self._run)
        self._wake: anyio.Event | None = None
        self._soon: set[str] = set()
        """Backends to poll at once, out of their schedule."""
        self._polling: set[str] = set()
        """Backends with a poll on the wire."""

    @property
    def running(self) -> bool:
        return self._task.running

    def start(self) -> None:
        self._task.start()

    def wake(self, backend: Backend) -> None:
        """Poll this backend (a router's model: its router) now instead of at its next interval; no other."""
        self._soon.add((backend.router or backend).name)
        if self._wake is not None:
            self._wake.set()

    async def aclose(self) -> None:
        await self._task.aclose()

    async def _run(self) -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(self._alarm.run)
            await self._schedule(group)
            group.cancel_scope.cancel()  # the balancer is gone: the alarm too

    async def _schedule(self, polls: anyio.abc.TaskGroup) -> None:
        # Each backend has at most one poll on the wire, started every interval once the previous
        # one finished: a backend that hangs until the poll timeout delays no other backend.
        # The balancer is held only while starting polls (see __init__).
        started: dict[str, float] = {}
        while True:
            self._wake = anyio.Event()  # before reading _soon: a wake() from now on ends the wait
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
                due = now - started.get(name, -interval) >= interval or name in soon
                if due and name not in self._polling:
                    started[name] = now
                    self._polling.add(name)
                    polls.start_soon(self._poll, balancer, backend, name=f"llamacpp-ha-poll-{name}")
            try:
                await expire_idle_leases(
                    balancer.scheduler.leases, balancer.stats, balancer.config.stream_idle_timeout_s
                )
            except Exception:
                logger.exception("closing idle responses failed")
            next_due = min(started.values(), default=now) + interval
            del balancer
            with anyio.move_on_after(max(0.01, next_due - time.monotonic())):
                await self._wake.wait()

    async def _poll(self, balancer: Balancer, backend: Backend) -> None:
        try:
            await balancer.poll_backend(backend)
        finally:
            self._polling.discard(backend.name)


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
