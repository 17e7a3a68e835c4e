from __future__ import annotations

from collections.abc import Sequence

from ._affinity import AffinityTable
from ._backend import Backend
from ._leases import Lease
from ._policies import Policy
from ._queue import Waiter, WaitQueue
from ._stats import Stats

__all__ = ["Scheduler"]


class Scheduler:
    """Grants free slots to waiting requests, oldest servable request first.

    :meth:`dispatch` runs to completion without awaiting, so a slot cannot be granted twice
    and a grant cannot be interrupted half-way. It is called on every change that can free
    a slot or add a request: a lease released, a poll result, a new or retried request.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        queue: WaitQueue,
        policy: Policy,
        affinity: AffinityTable,
        stats: Stats,
    ) -> None:
        self._backends = backends
        self._queue = queue
        self._policy = policy
        self._affinity = affinity
        self._stats = stats
        self.leases: set[Lease] = set()

    def dispatch(self) -> None:
        if not len(self._queue):
            return
        # Built once per call and kept up to date as slots are granted: a dispatch after one
        # released slot costs one pass over the backends, not one per loop turn.
        free = [backend for backend in self._backends if backend.free > 0]
        while free and len(self._queue):
            for waiter in self._queue.heads():
                candidates = [b for b in free if b.serves(waiter.model) and b.name not in waiter.excluded]
                if candidates:
                    self._queue.pop(waiter)
                    backend = self._grant(waiter, candidates)
                    if backend.free == 0:
                        free.remove(backend)
                    break
            else:
                return

    def _grant(self, waiter: Waiter, candidates: list[Backend]) -> Backend:
        key = waiter.affinity_key
        preferred = self._affinity.get(key) if key is not None else None
        backend = self._policy.choose(candidates, preferred)
        lease = Lease(backend, self._release)
        if preferred is not None:
            if backend.name == preferred:
                self._stats.affinity_hits += 1
                lease.affinity = "hit"
            else:
                self._stats.affinity_misses += 1
                lease.affinity = "miss"
        if key is not None:
            self._affinity.set(key, backend.name)
            lease.affinity = lease.affinity or "new"
        backend.in_flight += 1
        backend.requests += 1
        self._stats.dispatched += 1
        self.leases.add(lease)
        waiter.future.set_result(lease)
        return backend

    def _release(self, lease: Lease) -> None:
        self.leases.discard(lease)
        lease.backend.in_flight -= 1
        assert lease.backend.in_flight >= 0, "a lease was released twice"
        self.dispatch()
