from __future__ import annotations

import heapq
import itertools
from collections.abc import KeysView
from enum import Enum

import anyio

from ._leases import Lease
from ._prompt import NO_PROMPT, PromptShape

__all__ = ["Grant", "WaitQueue", "Waiter", "WaiterState"]

_COMPACT_AT = 64


class Grant:
    """What a waiting request is given, once: a lease, or the error that ends its wait.

    A future on anyio's event, so that it works under Trio too. The waiting task may be cancelled
    in the same instant a slot is granted to it: :meth:`abandon` then hands the lease back to be
    released, so the slot is never lost.
    """

    __slots__ = ("_abandoned", "_error", "_event", "_lease")

    def __init__(self) -> None:
        self._lease: Lease | None = None
        self._error: BaseException | None = None
        self._abandoned = False
        self._event: anyio.Event | None = None
        """Made by the first wait (a grant can be made outside an event loop)."""

    def done(self) -> bool:
        return self._lease is not None or self._error is not None or self._abandoned

    def give(self, lease: Lease) -> None:
        assert not self.done(), "a grant is given once"
        self._lease = lease
        if self._event is not None:
            self._event.set()

    def fail(self, error: BaseException) -> None:
        assert not self.done(), "a grant is given once"
        self._error = error
        if self._event is not None:
            self._event.set()

    def abandon(self) -> Lease | None:
        """The waiter gives up. Returns the lease if one was given meanwhile: the caller releases it."""
        if self._abandoned:
            return None
        self._abandoned = True
        return self._lease

    def result(self) -> Lease:
        if self._error is not None:
            raise self._error
        if self._lease is None:
            raise RuntimeError("nothing was granted")
        return self._lease

    async def wait(self) -> Lease:
        if not self.done():
            self._event = anyio.Event()
            await self._event.wait()
        return self.result()


class WaiterState(Enum):
    QUEUED = "queued"
    """In arrival order, to be served by the next free slot that suits it."""
    PARKED = "parked"
    """Waiting, with bounded patience, for the busy backend that holds its prefix."""
    DONE = "done"
    """Out of the queue: granted a slot, or gave up."""


class Waiter:
    """A request waiting for a slot."""

    __slots__ = (
        "deadline",
        "enqueued_at",
        "excluded",
        "grant",
        "model",
        "parked_at",
        "parked_on",
        "patience_spent",
        "pin",
        "predicted_wait_s",
        "prompt",
        "saved_bytes",
        "seq",
        "state",
    )

    def __init__(
        self,
        seq: int,
        model: str | None,
        grant: Grant,
        enqueued_at: float,
        *,
        prompt: PromptShape = NO_PROMPT,
        pin: str | None = None,
        excluded: frozenset[str] = frozenset(),
        deadline: float = float("inf"),
    ) -> None:
        self.seq = seq
        self.model = model
        self.grant = grant
        self.enqueued_at = enqueued_at
        """On the scheduler's clock (``time.monotonic``)."""
        self.prompt = prompt
        self.pin = pin
        self.excluded = excluded
        self.deadline = deadline
        self.state = WaiterState.QUEUED
        self.parked_on: str | None = None
        self.saved_bytes = 0
        """Prompt bytes it finds cached on ``parked_on``: a freed slot there serves the
        waiter that saves the most first, then the oldest."""
        self.patience_spent = False
        """It waited for a busy backend once already: from now on it is served in arrival order."""
        self.parked_at: float | None = None
        """When it began waiting for a busy backend (it waits for one at most once)."""
        self.predicted_wait_s = 0.0
        """How long that wait was predicted to last, when it began."""

    @property
    def waiting(self) -> bool:
        return self.state is not WaiterState.DONE and not self.grant.done()

    @property
    def weight(self) -> int:
        return self.prompt.weight


class WaitQueue:
    """The waiting requests: one arrival-ordered heap per model, retries apart, parked waiters per backend.

    Arrival order is a global sequence number, so the oldest servable request goes first
    across all models, while a request for a model nobody can serve right now does not block
    the ones behind it. A retried request (which excludes the backends that failed it) sits
    apart, so that it cannot block its model's queue while a slot it may not use is free.
    Parked waiters are indexed by the backend they wait for, best saving first, and leave the
    arrival order until their patience ends. A waiter that gives up is dropped lazily; the
    heaps are rebuilt once dead entries outnumber live ones, so memory follows the live count.
    """

    def __init__(self) -> None:
        self._fifo: dict[str | None, list[tuple[int, int, Waiter]]] = {}
        self._retries: list[Waiter] = []
        self._parked: dict[str, list[tuple[float, int, Waiter]]] = {}
        self._parked_count: dict[str, int] = {}
        self._patience: list[tuple[float, int, Waiter]] = []
        self._behind: dict[int, list[Waiter]] = {}
        """Parked waiters that wait for one running request to finish (its slot holds their prefix)."""
        self._unclocked: list[Waiter] = []
        """Parked while no slot was free anywhere: their patience starts once a slot is free unused."""
        self._seq = itertools.count()
        self._pushes = itertools.count()
        self._waiting = 0
        self._dead = 0

    def __len__(self) -> int:
        return self._waiting

    def next_seq(self) -> int:
        return next(self._seq)

    def entries(self) -> int:
        """Entries held, live and dead (memory, for tests)."""
        heaps = sum(len(q) for q in self._fifo.values()) + sum(len(q) for q in self._parked.values())
        behind = sum(len(q) for q in self._behind.values())
        return heaps + len(self._retries) + len(self._patience) + behind + len(self._unclocked)

    def push(self, waiter: Waiter) -> None:
        waiter.state = WaiterState.QUEUED
        self._enqueue(waiter)
        self._waiting += 1

    def _enqueue(self, waiter: Waiter) -> None:
        if waiter.excluded:
            self._retries.append(waiter)
            self._retries.sort(key=lambda w: w.seq)
        else:
            queue = self._fifo.setdefault(waiter.model, [])
            heapq.heappush(queue, (waiter.seq, next(self._pushes), waiter))

    def heads(self) -> list[Waiter]:
        """The first live queued waiter of each model, and every live retry, oldest first."""
        heads: list[Waiter] = []
        for model in list(self._fifo):
            queue = self._fifo[model]
            while queue and not self._live(queue[0][2]):
                heapq.heappop(queue)
            if queue:
                heads.append(queue[0][2])
            else:
                del self._fifo[model]
        if self._retries:
            self._retries = [w for w in self._retries if self._live(w)]
            heads += self._retries
            heads.sort(key=lambda waiter: waiter.seq)
        elif len(heads) > 1:
            heads.sort(key=lambda waiter: waiter.seq)
        return heads

    def take(self, waiter: Waiter) -> None:
        """Remove a waiter that is being granted a slot (a head, a retry or a parked one)."""
        self._leave(waiter)
        if waiter.excluded and waiter in self._retries:
            self._retries.remove(waiter)

    def park(
        self, waiter: Waiter, backend: str, saved_bytes: int, until: float | None, *, behind: int | None = None
    ) -> None:
        """A waiter waits for ``backend`` until ``until`` at the latest (None: until a slot elsewhere
        is free and unused, see :meth:`start_patience`).

        With ``behind`` (a running request's id) it waits for that request to finish first: its
        slot holds the prefix, and only then does a slot of that backend serve it.
        """
        # Its arrival-order entry stays behind and is skipped while it is parked (and dropped if a
        # newer entry is pushed when its patience ends).
        if waiter.excluded:
            self._retries.remove(waiter)
        waiter.state = WaiterState.PARKED
        waiter.parked_on = backend
        waiter.saved_bytes = saved_bytes
        if behind is None:
            heapq.heappush(self._parked.setdefault(backend, []), (-saved_bytes, waiter.seq, waiter))
        else:
            self._behind.setdefault(behind, []).append(waiter)
        self._parked_count[backend] = self._parked_count.get(backend, 0) + 1
        if until is None:
            self._unclocked.append(waiter)
        else:
            heapq.heappush(self._patience, (until, waiter.seq, waiter))

    def wait_behind(self, waiter: Waiter, request: int) -> None:
        """The best parked waiter of its backend (just returned by :meth:`best_parked`) waits for a
        running request to finish first, its patience clock unchanged."""
        assert waiter.parked_on is not None
        parked = self._parked[waiter.parked_on]
        assert parked[0][2] is waiter
        heapq.heappop(parked)
        self._behind.setdefault(request, []).append(waiter)

    def start_patience(self, until: float) -> None:
        """Slots are free and unused: waiters parked while nothing was free start counting now."""
        for waiter in self._unclocked:
            if waiter.state is WaiterState.PARKED:
                heapq.heappush(self._patience, (min(until, waiter.deadline), waiter.seq, waiter))
        self._unclocked.clear()

    @property
    def unclocked(self) -> bool:
        return bool(self._unclocked)

    def finished(self, request: int) -> None:
        """A running request finished: the waiters behind it now wait for a slot of its backend."""
        for waiter in self._behind.pop(request, ()):
            if waiter.state is WaiterState.PARKED and waiter.parked_on is not None:
                heapq.heappush(self._parked.setdefault(waiter.parked_on, []), (-waiter.saved_bytes, waiter.seq, waiter))

    def parked_count(self, backend: str) -> int:
        return self._parked_count.get(backend, 0)

    def next_patience_end(self) -> float | None:
        while self._patience and self._patience[0][2].state is not WaiterState.PARKED:
            heapq.heappop(self._patience)
        return self._patience[0][0] if self._patience else None

    def end_patience(self, now: float) -> int:
        """Parked waiters whose patience ran out go back to arrival order; returns how many."""
        patience = self._patience
        ended = 0
        while patience and (patience[0][0] <= now or patience[0][2].state is not WaiterState.PARKED):
            _, _, waiter = heapq.heappop(patience)
            if waiter.state is WaiterState.PARKED:
                self._unpark(waiter)
                ended += 1
        return ended

    def unpark_all(self, backend: str) -> None:
        """The backend can no longer serve: its parked waiters go back to arrival order."""
        for _, _, waiter in self._parked.pop(backend, []):
            if waiter.state is WaiterState.PARKED and waiter.parked_on == backend:
                self._unpark(waiter)
        self._parked_count.pop(backend, None)

    def _unpark(self, waiter: Waiter) -> None:
        assert waiter.parked_on is not None
        self._parked_count[waiter.parked_on] -= 1
        waiter.parked_on = None
        waiter.patience_spent = True
        waiter.state = WaiterState.QUEUED
        self._enqueue(waiter)

    def parked_backends(self) -> KeysView[str]:
        """The backends some waiter may be parked for (each has one live waiter or more, or entries
        still to drop)."""
        return self._parked.keys()

    def best_parked(self, backend: str) -> Waiter | None:
        """The live waiter parked for ``backend`` that saves the most there, the oldest of equals.

        Saved bytes, not seconds: requests waiting for one prompt's copy save the same, and the
        oldest, whose patience ends first, goes first (seconds, priced at different moments, would
        order them by how long the queue was when each arrived)."""
        queue = self._parked.get(backend)
        while queue:
            waiter = queue[0][2]
            if waiter.parked_on == backend and self._live(waiter, WaiterState.PARKED):
                return waiter
            heapq.heappop(queue)
        if queue is not None:
            del self._parked[backend]
        return None

    def _live(self, waiter: Waiter, state: WaiterState = WaiterState.QUEUED) -> bool:
        """Whether the waiter is in ``state`` and its request still waits.

        A waiter whose grant is done without the queue knowing (given up, or failed on close) is
        counted out here; its own ``forget`` later finds it gone.
        """
        if waiter.state is not state:
            return False
        if waiter.grant.done():
            self._leave(waiter)
            self._dead += 1
            return False
        return True

    def forget(self, waiter: Waiter) -> None:
        """A waiter gave up (timed out, cancelled, refused): count it out; its entries go lazily."""
        if waiter.state is not WaiterState.DONE:
            self._leave(waiter)
            self._dead += 1
            if self._dead > _COMPACT_AT and self._dead > self._waiting:
                self._compact()

    def _leave(self, waiter: Waiter) -> None:
        if waiter.state is WaiterState.PARKED and waiter.parked_on is not None:
            self._parked_count[waiter.parked_on] -= 1
        waiter.state = WaiterState.DONE
        waiter.parked_on = None
        self._waiting -= 1

    def _compact(self) -> None:
        for model, queue in list(self._fifo.items()):
            live = [entry for entry in queue if entry[2].state is WaiterState.QUEUED]
            heapq.heapify(live)
            if live:
                self._fifo[model] = live
            else:
                del self._fifo[model]
        for backend, parked in list(self._parked.items()):
            kept = [e for e in parked if e[2].state is WaiterState.PARKED and e[2].parked_on == backend]
            heapq.heapify(kept)
            if kept:
                self._parked[backend] = kept
            else:
                del self._parked[backend]
        self._patience = [e for e in self._patience if e[2].state is WaiterState.PARKED]
        heapq.heapify(self._patience)
        self._retries = [w for w in self._retries if w.state is WaiterState.QUEUED]
        self._unclocked = [w for w in self._unclocked if w.state is WaiterState.PARKED]
        behind: dict[int, list[Waiter]] = {}
        for key, waiters in self._behind.items():
            still = [waiter for waiter in waiters if waiter.state is WaiterState.PARKED]
            if still:
                behind[key] = still
        self._behind = behind
        self._dead = 0

    def drain(self) -> list[Waiter]:
        """Take every live waiter out of the queue (the balancer is closing)."""
        waiters = {id(e[2]): e[2] for q in self._fifo.values() for e in q}
        waiters |= {id(e[2]): e[2] for q in self._parked.values() for e in q}
        waiters |= {id(w): w for w in self._retries}
        waiters |= {id(w): w for q in self._behind.values() for w in q}
        waiters |= {id(w): w for w in self._unclocked}
        live = [waiter for waiter in waiters.values() if waiter.waiting]
        for waiter in live:
            self._leave(waiter)
        self._fifo.clear()
        self._parked.clear()
        self._parked_count.clear()
        self._patience.clear()
        self._retries.clear()
        self._behind.clear()
        self._unclocked.clear()
        self._waiting = 0
        self._dead = 0
        return sorted(live, key=lambda waiter: waiter.seq)
