from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterator

from ._leases import Lease

__all__ = ["WaitQueue", "Waiter"]


class Waiter:
    """A request waiting for a slot."""

    __slots__ = ("affinity_key", "enqueued_at", "excluded", "future", "model", "seq")

    def __init__(
        self,
        seq: int,
        model: str | None,
        affinity_key: str | None,
        excluded: frozenset[str],
        future: asyncio.Future[Lease],
        enqueued_at: float,
    ) -> None:
        self.seq = seq
        self.model = model
        self.affinity_key = affinity_key
        self.excluded = excluded
        self.future = future
        self.enqueued_at = enqueued_at

    @property
    def waiting(self) -> bool:
        return not self.future.done()


class WaitQueue:
    """The global FIFO of waiting requests, kept as one FIFO per requested model.

    Arrival order is a global sequence number, so the oldest servable request goes first
    across all models, while a request for a model nobody can serve right now does not
    block the ones behind it. A waiter that gives up is only marked (its future is done)
    and dropped when it reaches a head, which keeps giving up O(1).
    """

    def __init__(self) -> None:
        self._by_model: dict[str | None, deque[Waiter]] = {}
        self._seq = itertools.count()
        self._waiting = 0

    def __len__(self) -> int:
        return self._waiting

    def next_seq(self) -> int:
        return next(self._seq)

    def push(self, waiter: Waiter) -> None:
        queue = self._by_model.setdefault(waiter.model, deque())
        if queue and waiter.seq < queue[-1].seq:
            # A retried request keeps its place: it goes before later arrivals.
            position = next(i for i, other in enumerate(queue) if other.seq > waiter.seq)
            queue.insert(position, waiter)
        else:
            queue.append(waiter)
        self._waiting += 1

    def forget(self, waiter: Waiter) -> None:
        """Count out a waiter whose future is done (granted or given up)."""
        self._waiting -= 1

    def heads(self) -> Iterator[Waiter]:
        """The first live waiter of each model's FIFO, oldest first."""
        heads = []
        for model in list(self._by_model):
            queue = self._by_model[model]
            while queue and not queue[0].waiting:
                queue.popleft()
            if queue:
                heads.append(queue[0])
            else:
                del self._by_model[model]
        heads.sort(key=lambda waiter: waiter.seq)
        return iter(heads)

    def pop(self, waiter: Waiter) -> None:
        """Remove a head that is being granted a slot."""
        queue = self._by_model[waiter.model]
        assert queue[0] is waiter
        queue.popleft()
        self._waiting -= 1

    def drain(self) -> list[Waiter]:
        """Take every live waiter out of the queue (the balancer is closing)."""
        waiters = [w for queue in self._by_model.values() for w in queue if w.waiting]
        self._by_model.clear()
        self._waiting = 0
        return waiters
