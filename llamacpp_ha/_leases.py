from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from ._backend import Backend

__all__ = ["Lease"]


class Lease:
    """One slot on one backend, held from dispatch until the response body is finished.

    :meth:`release` gives the slot back exactly once, synchronously: the scheduler sees the
    free slot before the caller's next await, so no request waits beside an idle slot.
    """

    __slots__ = (
        "_on_release",
        "acquired_at",
        "affinity",
        "backend",
        "closer",
        "last_activity",
        "reading",
        "released",
    )

    def __init__(self, backend: Backend, on_release: Callable[[Lease], None]) -> None:
        self.backend = backend
        self._on_release = on_release
        self.released = False
        self.acquired_at = time.monotonic()
        self.last_activity = self.acquired_at
        self.reading = False
        """True while the consumer waits for the backend's next bytes (not idle, however slow)."""
        self.affinity: str | None = None
        """``hit``, ``miss`` or ``new`` when the request had a conversation key."""
        self.closer: Callable[[], Awaitable[None]] | None = None
        """Closes the response this lease serves; called when the consumer abandons it."""

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def idle_for(self, now: float) -> float:
        return 0.0 if self.reading else now - self.last_activity

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self._on_release(self)
