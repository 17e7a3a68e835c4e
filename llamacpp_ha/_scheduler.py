from __future__ import annotations

import functools
import hashlib
import heapq
import itertools
import math
import time
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._affinity import AffinityTable
from ._backend import Backend, BackendState
from ._background import Alarm
from ._cost import CostModel
from ._leases import Lease
from ._policies import Policy
from ._prefix import PrefixIndex
from ._prompt import PromptShape
from ._queue import Waiter, WaiterState, WaitQueue
from ._stats import Stats

if TYPE_CHECKING:
    from ._shared import SharedFleet

__all__ = ["Scheduler", "SchedulerSettings"]

_MIN_SAVING_S = 0.02
"""Waiting for a busy backend must promise at least this much, or it is not worth the bookkeeping."""


_WAIT_RISK_SLOTS = 4.0
"""A wait for a busy backend must save ``1 + this / its slots`` times the predicted wait."""
_OWN_WORK_AGAIN = 1.0
"""How many times more a request's own uncached prefill counts, for the requests it delays."""
_WAIT_ALPHA = 0.05
_HOME_MARGIN = 0.25
"""How much more a prompt's home backend may cost than the best before it goes elsewhere."""
_HOMES_CACHED = 65_536
"""Prompt beginnings whose home backend is remembered; the cache starts over past this."""
_MAX_PRICED = 16
"""With more free backends than this, a decision prices the ones holding the prompt and this many
of the least loaded others, not all of them."""
_SHORT_SHARE = 0.1
"""A request whose uncached prefill takes at most this share of ``prefill_backlog_s`` is not held
back by a backend's backlog."""
_TIE_S = 0.005
_TIE_SHARE = 0.05
"""Predictions this close (5 ms, or 5%) are equal: then the least busy backend wins."""


def _by_position(backend: Backend) -> int:
    return backend.position


def _by_load(backend: Backend) -> tuple[float, int]:
    return backend.load, backend.position


def _jump(key: int, buckets: int) -> int:
    """Jump consistent hashing (Lamping and Veach, 2014): the bucket of a 64-bit key among
    ``buckets``, in O(log buckets) steps. A bucket added at the end takes 1/buckets of the keys
    and moves no other; backends are only ever appended to the fleet. Rendezvous hashing, used
    before, hashed the key with every backend's name: a millisecond at 1,000 backends on every
    new prompt beginning."""
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * 2862933555777941757 + 1) & 0xFFFF_FFFF_FFFF_FFFF
        candidate = int((bucket + 1) * (2**31 / ((key >> 33) + 1)))
    return bucket


def _shared_blocks(a: tuple[bytes, ...], b: tuple[bytes, ...]) -> int:
    """Leading blocks two prompts share (chained hashes: block k equal means all before are)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[middle - 1] == b[middle - 1]:
            low = middle
        else:
            high = middle - 1
    return low


def _shared_bytes(prompt: PromptShape, lease: Lease, block_bytes: int) -> int:
    """How much of the prompt a running request's slot will hold when it finishes."""
    shared = _shared_blocks(prompt.blocks, lease.blocks) * block_bytes
    if lease.end is not None and lease.end[0] > shared and lease.end in prompt.marks:
        return lease.end[0]
    return shared


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    cost_aware: bool = True
    """Route by predicted time to first token and let slots pick their waiters (the ``affinity`` policy)."""
    prefill_backlog_s: float | None = 1.0
    """A backend takes new requests only while its queued prefill is shorter than this (None: off)."""
    block_bytes: int = 512
    patience_max_s: float = 8.0
    ram_cache_tokens: int = 0


@dataclass(slots=True)
class _Option:
    backend: Backend
    matched_blocks: int
    held_bytes: int
    """What the backend holds of the prompt: its matched blocks, or more by an end mark."""
    uncached_tokens: float
    prefill_s: float
    """Predicted time to first token, once a slot is free."""
    score: float
    """What the decision minimizes: the predicted time plus the time this prefill costs the
    requests that will queue behind it there (a cache miss is paid twice: by the request and by
    the backend's throughput)."""


class Scheduler:
    """Grants free slots to waiting requests.

    With the cost-aware policy a request goes where its predicted time to first token is
    lowest: the wait for a slot there plus the uncached part of its prompt, behind the
    prefills already running there, at that backend's measured rate. A request whose prefix
    lives on a busy backend may wait for it (it is *parked*) while the predicted saving
    exceeds the predicted wait, never past ``patience_max_s`` after its arrival; a slot that
    frees there picks the parked waiter that saves the most. Past its patience a waiter is
    served in arrival order, and a waiter older than ``patience_max_s`` goes before parked
    ones, so cache-hitting traffic cannot starve it.

    :meth:`dispatch` runs to completion without awaiting, so a slot cannot be granted twice
    and a grant cannot be interrupted half-way. It is called on every change that can free
    a slot or add a request: a lease released, a poll result, a new or retried request, and
    the end of a parked waiter's patience.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        queue: WaitQueue,
        policy: Policy,
        affinity: AffinityTable,
        stats: Stats,
        settings: SchedulerSettings | None = None,
    ) -> None:
        self._backends = backends
        self._by_name = {backend.name: backend for backend in backends}
        self._queue = queue
        self._policy = policy
        self._affinity = affinity
        self._stats = stats
        self.settings = settings or SchedulerSettings()
        self.index = PrefixIndex()
        self.cost = CostModel(backends)
        self.leases: set[Lease] = set()
        self._running: dict[bytes, set[Lease]] = {}
        """Running requests by their prompt's first block: their slots will hold their prompts."""
        self.shared: SharedFleet | None = None
        """Set in shared mode: told of releases, newly cached prompts and pins, for the peers."""
        self._generations = {backend.name: backend.generation for backend in backends}
        self._homes: dict[tuple[bytes, str | None], Backend] = {}
        """(First block, model) -> home backend (see :meth:`_home`)."""
        self._serving: dict[str | None, list[Backend]] = {}
        """Model -> the backends serving it, in fleet order (see :meth:`_serving_backends`)."""
        self._models_changes = 0
        self._with_free_slots: set[Backend] = set()
        for position, backend in enumerate(backends):
            self._watch(backend, position)
        self.model_loaded: Callable[[Backend], None] | None = None
        """Told when a request that loaded a router's model starts answering (to poll it at once)."""
        self._turn = 0
        self._cold_turn = 0
        """Where the next sample of the fleet for a cold price starts (see :meth:`_cold_sample`)."""
        self._typical_wait_s = 0.0
        """Moving average of how long granted requests waited."""
        self.alarm = Alarm(self.dispatch)
        """Dispatches again when a patience ends or a prompt is surely processed (run by the poller)."""
        self._gated_until: dict[Backend, float] = {}
        """Backends closed by their prefill backlog, until the first time it can shrink unannounced."""
        self._seen_open: set[Backend] = set()
        """Backends whose backlog let them take a request when last looked at, and that were granted
        nothing since: a backlog only shrinks with time, so they still do."""
        self._reopen: list[tuple[float, int, Backend]] = []
        self._closings = itertools.count()
        self._wakes: list[float] = []
        """When running prompts are surely processed (their backends may take requests again)."""

    # -- events -----------------------------------------------------------------------------

    def _watch(self, backend: Backend, position: int) -> None:
        backend.position = position
        backend.with_free_slots = self._with_free_slots
        if backend.free > 0:
            self._with_free_slots.add(backend)

    def backend_added(self, backend: Backend) -> None:
        """A router listed a new model: its backend joins the fleet (already in the shared list)."""
        self._watch(backend, len(self._by_name))
        self._by_name[backend.name] = backend
        self._generations[backend.name] = backend.generation
        self._forget_homes()  # a new backend may be the home of some prompts

    def backends_changed(self) -> None:
        """A poll finished: forget the caches of restarted backends, resize the index, dispatch."""
        for backend in self._backends:
            if backend.generation != self._generations[backend.name]:
                self._generations[backend.name] = backend.generation
                self.index.clear(backend.name)
            self.index.set_ceiling(backend.name, self._ceiling_blocks(backend))
            self.index.set_slots(backend.name, backend.capacity)
            if not backend.routable:
                self._queue.unpark_all(backend.name)
        models_changes = sum(backend.models_changes for backend in self._backends)
        if models_changes != self._models_changes:
            self._models_changes = models_changes
            self._forget_homes()
        self.dispatch()

    def _forget_homes(self) -> None:
        self._homes.clear()
        self._serving.clear()

    def _ceiling_blocks(self, backend: Backend) -> int:
        """What a backend can hold: one prompt per slot (at most its context), plus its RAM cache."""
        tokens_per_block = self.settings.block_bytes * self.cost.tokens_per_char(None)
        per_slot = float(backend.n_ctx or 4096)
        if self.cost.mean_prompt_tokens is not None:
            per_slot = min(per_slot, 1.5 * self.cost.mean_prompt_tokens)
        return int((backend.capacity * per_slot + self.settings.ram_cache_tokens) / tokens_per_block)

    def dispatch(self) -> None:
        queue = self._queue
        if not len(queue):
            return
        now = time.monotonic()
        self._stats.patience_ran_out += queue.end_patience(now)
        # Built once per call and kept up to date as slots are granted: a dispatch after one
        # released slot costs one pass over the backends, not one per loop turn.
        self._reopen_gated(now)
        free = []
        closed = []
        seen_open = self._seen_open
        for backend in self._with_free_slots:
            # ``_accepting`` starts with this test; made here it saves a call per free backend,
            # half a dispatch's time with hundreds free (bench.scheduler, 1,000 backends).
            if backend in seen_open or self._accepting(backend, now):
                free.append(backend)
            else:
                closed.append(backend)
        # Closed by their prefill backlog: out of the set until they reopen, so a dispatch over a
        # large fleet under load looks only at the backends that can take a request.
        self._with_free_slots.difference_update(closed)
        if len(free) <= _MAX_PRICED or not self.settings.cost_aware:
            free.sort(key=_by_position)
        # (With more free, each waiter prices a shortlist, sorted when it is made.)
        if free and self.settings.cost_aware:
            # Waiters past their patience first, then the parked ones, then arrival order.
            self._serve_in_order(free, now, overdue_only=True)
            if free:
                self._serve_parked(free, now)
        if self._gated_until and self.settings.cost_aware:
            self._serve_parked_short(now)
        if free:
            self._serve_in_order(free, now)
        if free and self._queue.unclocked:
            self._queue.start_patience(now + self.settings.patience_max_s)
        self._arm_timer()

    def _serve_parked(self, free: list[Backend], now: float) -> None:
        """Each free slot first picks, among the waiters parked for its backend, the best saving."""
        for backend in self._with_parked(set(free)):
            self._serve_parked_on(backend, now, closed=False)
            if backend.free == 0 or not self._accepting(backend, now):
                free.remove(backend)

    def _serve_parked_short(self, now: float) -> None:
        """A backend its backlog closed still serves a waiter parked for it whose uncached prefill
        is short (see :meth:`_squeeze_in`): typically a request that waited for a running one with
        its prompt, and now finds all of it cached but the question."""
        for backend in self._with_parked(self._gated_until.keys()):
            self._serve_parked_on(backend, now, closed=True)

    def _with_parked(self, backends: Set[Backend]) -> list[Backend]:
        """Those of ``backends`` some waiter is parked for, in fleet order. With hundreds of
        backends and a few of them with parked waiters, it walks the few."""
        parked_on = self._queue.parked_backends()
        if len(parked_on) < len(backends):
            found = [b for b in map(self._by_name.get, parked_on) if b is not None and b in backends]
        else:
            found = [b for b in backends if b.name in parked_on]
        return sorted(found, key=_by_position)

    def _serve_parked_on(self, backend: Backend, now: float, *, closed: bool) -> None:
        """Grant the backend's free slots to its parked waiters, best saving first, while it accepts
        them (``closed``: while their uncached prefill is short)."""
        while backend.free > 0:
            waiter = self._queue.best_parked(backend.name)
            if waiter is None or not self._fits(waiter, backend):
                return
            user = self._copy_user(waiter, backend)
            if user is not None:
                # A request granted a moment ago took the copy it waited for: wait for that one.
                self._queue.wait_behind(waiter, id(user))
                continue
            if closed and not self._short(self._options(waiter, [backend], now)[0]):
                return
            self._queue.take(waiter)
            self._grant(waiter, backend, now)
            if not closed and not self._accepting(backend, now):
                return

    def _short(self, option: _Option) -> bool:
        """Whether the uncached part of a prompt is short enough to pass a closed backend's gate."""
        limit = self.settings.prefill_backlog_s
        return (
            limit is not None
            and option.uncached_tokens / self.cost.prefill_rate(option.backend) <= _SHORT_SHARE * limit
        )

    def _serve_in_order(self, free: list[Backend], now: float, *, overdue_only: bool = False) -> None:
        """Heads in arrival order take the free slots; ``overdue_only`` stops at the first patient head."""
        queue = self._queue
        least_loaded: list[Backend] | None = None
        while free and len(queue):
            for waiter in queue.heads():
                if overdue_only and not self._overdue(waiter, now):
                    return
                if self.settings.cost_aware and len(free) > _MAX_PRICED:
                    if least_loaded is None:
                        least_loaded = sorted(free, key=_by_load, reverse=True)
                    candidates = self._shortlist(waiter, least_loaded, now)
                else:
                    candidates = sorted((b for b in free if self._eligible(waiter, b)), key=_by_position)
                if not candidates:
                    continue
                if self.settings.cost_aware:
                    backend = self._decide(waiter, candidates, now)
                    if backend is None:
                        break  # parked: look at the heads again
                else:
                    backend = self._policy.choose(candidates)
                queue.take(waiter)
                self._grant(waiter, backend, now)
                if backend.free == 0 or not self._accepting(backend, now):
                    free.remove(backend)
                break
            else:
                return

    def _shortlist(self, waiter: Waiter, least_loaded: list[Backend], now: float) -> list[Backend]:
        """The free backends worth pricing when hundreds are free: those holding the prompt's
        beginning or its end marks, its pinned and home backends, and the least loaded others.

        Pricing every free backend for every waiter costs O(free) each, and a long queue of
        requests that choose to wait for their prefixes would price them all once per waiter."""
        shortlist: dict[Backend, None] = {}

        def consider(backend: Backend | None) -> None:
            if (
                backend is not None and backend not in shortlist and backend.free > 0
                and self._accepting(backend, now) and self._eligible(waiter, backend)
            ):  # fmt: skip
                shortlist[backend] = None

        prompt = waiter.prompt
        if prompt.blocks:
            holding = self.index.holders(prompt.blocks[0]) | self.index.end_holders(prompt.marks, 0)
            for name in itertools.islice(holding, _MAX_PRICED):
                consider(self._by_name.get(name))
            consider(self._home_of(prompt.blocks[0], waiter.model))
        if waiter.pin is not None:
            pinned = self._affinity.get(waiter.pin)
            consider(self._by_name.get(pinned) if pinned is not None else None)
        # Least loaded last. Those a grant filled or closed since are dropped for good as they are
        # met; the ones this waiter may not use (another model, excluded) are put back.
        kept: list[Backend] = []
        found = 0
        while least_loaded and found < _MAX_PRICED:
            backend = least_loaded.pop()
            if backend.free == 0 or not self._accepting(backend, now):
                continue
            kept.append(backend)
            if backend not in shortlist and self._eligible(waiter, backend):
                shortlist[backend] = None
                found += 1
        least_loaded.extend(reversed(kept))
        return sorted(shortlist, key=_by_position)

    def _accepting(self, backend: Backend, now: float) -> bool:
        """A free slot is not idle compute: a backend busy prefilling takes no new request until its
        backlog is short, so requests wait here, where a freed backend can pick what it has cached,
        instead of sharing its compute with a dozen cold prompts inside llama-server."""
        if self.settings.prefill_backlog_s is None or not self.settings.cost_aware or not backend.leases:
            return True
        if backend in self._seen_open:
            return True
        if now < self._gated_until.get(backend, 0.0):
            return False
        backlog_s = backend.pending_prefill(now) / self.cost.prefill_rate(backend)
        if backlog_s < self.settings.prefill_backlog_s:
            self._seen_open.add(backend)
            return True
        # Its backlog shrinks only when a prompt is processed (a first byte), a request ends, or a
        # prompt's processing deadline passes: it stays closed until the first of those.
        until = min((lease.prefill_deadline for lease in backend.leases if lease.prefilling(now)), default=now)
        self._gated_until[backend] = until
        heapq.heappush(self._reopen, (until, next(self._closings), backend))
        return False

    def _reopen_gated(self, now: float) -> None:
        """Backends whose backlog closed them until a processing deadline that has passed."""
        reopen = self._reopen
        while reopen and reopen[0][0] <= now:
            _, _, backend = heapq.heappop(reopen)
            if self._gated_until.get(backend, math.inf) <= now:
                self._open(backend)

    def _open(self, backend: Backend) -> None:
        """A closed backend's backlog may have shrunk: it is looked at again."""
        if self._gated_until.pop(backend, None) is not None and backend.free > 0:
            self._with_free_slots.add(backend)

    def _overdue(self, waiter: Waiter, now: float) -> bool:
        """Waited ``patience_max_s`` longer than requests typically wait now: it goes first.

        Parked requests take the slots of the backends that hold their prefixes before requests in
        arrival order do; this bounds what that costs any one request. Under saturation everyone
        waits long, and the bound is counted beyond that wait, or arrival order would take over
        and every slot would go to whoever is oldest, wherever its prefix is cached.
        """
        return now - waiter.enqueued_at >= self._typical_wait_s + self.settings.patience_max_s

    @staticmethod
    def _fits(waiter: Waiter, backend: Backend) -> bool:
        return backend.free >= min(waiter.weight, backend.capacity)

    def _eligible(self, waiter: Waiter, backend: Backend) -> bool:
        if not (self._fits(waiter, backend) and backend.serves(waiter.model) and backend.name not in waiter.excluded):
            return False
        return backend.state is not BackendState.UNLOADED or self._worth_loading(waiter, backend)

    def _worth_loading(self, waiter: Waiter, backend: Backend) -> bool:
        """Whether a request should load its model on a router that has it unloaded: when no backend
        runs that model (or is loading it), or when it has waited longer than loading takes.
        Loading evicts another model when the router is full, so it is not done for a free slot."""
        if waiter.model is None:
            return False  # a router answers 400 to a request without a model, and loads nothing
        if time.monotonic() - waiter.enqueued_at >= self.cost.load_s(backend):
            return True
        return not any(
            b.serves(waiter.model) and b.name not in waiter.excluded and b.runs_model
            for b in self._backends
            if b is not backend
        )

    def queued(self, waiter: Waiter) -> None:
        """A new request found no free slot: a short one may go where a backlog closed the slots
        (see :meth:`_squeeze_in`); if a full backend holds its prefix, it waits for that backend
        rather than for whichever slot frees first (then a freed slot there picks it)."""
        if not self.settings.cost_aware or waiter.state is not WaiterState.QUEUED:
            return
        now = time.monotonic()
        if self._squeeze_in(waiter, now) or not waiter.prompt.blocks or waiter.excluded or waiter.pin is not None:
            return
        cold = self._options(waiter, self._cold_sample(waiter), now, held_bytes=0)
        if not cold:
            return
        baseline = min(cold, key=lambda o: o.score)
        plan = self._best_wait(waiter, baseline, now)
        if plan is None:
            return
        held, behind, _, wait_s = plan
        # No clock yet: waiting costs it nothing while no slot is free anywhere. Its patience
        # starts when a slot it could have had stays free (see dispatch).
        self._park(waiter, held.backend.name, held.held_bytes, None, now, wait_s, behind=behind)

    def _cold_sample(self, waiter: Waiter) -> list[Backend]:
        """The backends to price the waiter cold on, for what not waiting would cost: every routable
        one serving its model, or past ``_MAX_PRICED`` of them, that many from a start that turns
        with each call. Pricing the whole fleet made each arrival at a full fleet cost O(backends)
        (0.35 ms at 200 backends, 2 ms at 1,000: ``bench.scheduler``); a sample of busy backends
        finds one as cheap as the cheapest but for the few busy prefilling."""
        serving = self._serving_backends(waiter.model)
        start = 0
        if len(serving) > _MAX_PRICED:
            start = self._cold_turn % len(serving)
            self._cold_turn += _MAX_PRICED
        turned = itertools.chain(itertools.islice(serving, start, None), itertools.islice(serving, start))
        return list(itertools.islice((b for b in turned if b.routable), _MAX_PRICED))

    def _squeeze_in(self, waiter: Waiter, now: float) -> bool:
        """A request whose uncached prefill is short goes to a backend its backlog closed, if one has
        a free slot: llama-server processes it in the same batches as the long prompts there, and
        it waits a fraction of what they take instead of all of it (a long trace prompt doubled
        the median time to first token at half load). It delays those prompts by its own length."""
        if not self._gated_until:  # (only a backlog limit closes backends)
            return False
        closed = [b for b in self._gated_until if b.free > 0 and self._eligible(waiter, b)]
        if not closed:
            return False
        options = [option for option in self._options(waiter, closed, now) if self._short(option)]
        if not options:
            return False
        chosen = self._cheapest(options).backend
        self._queue.take(waiter)
        self._grant(waiter, chosen, now)
        self._arm_timer()  # its prompt's processing deadline may be the next time to dispatch
        return True

    # -- the cost decision ------------------------------------------------------------------

    def _options(
        self, waiter: Waiter, backends: Sequence[Backend], now: float, *, held_bytes: int | None = None
    ) -> list[_Option]:
        """What the waiter would cost on each backend (holding ``held_bytes`` instead of the index's)."""
        prompt = waiter.prompt
        blocks = prompt.blocks
        block_bytes = self.settings.block_bytes
        holders = self.index.holders(blocks[0]) if blocks and held_bytes is None else set()
        tokens_per_char = self.cost.tokens_per_char(waiter.model)
        prompt_tokens = max(1.0, prompt.chars * tokens_per_char)
        queued_per_backend = len(self._queue) / max(1, len(self._backends))
        options = []
        for backend in backends:
            if held_bytes is not None:
                held, matched = held_bytes, held_bytes // block_bytes
            elif backend.name in holders and self._copy_free(backend, blocks[0]):
                matched = self.index.match(backend.name, blocks)
                held = self.index.held_bytes(backend.name, prompt.marks, matched, block_bytes)
            else:
                held = matched = 0
            uncached = max(1.0, prompt_tokens - held * tokens_per_char)
            pending, prefilling = backend.prefill_work(now)
            prefill_s = self.cost.prefill_s(backend, uncached, now, pending=pending)
            # llama-server batches the prompts it processes: this one's uncached tokens also delay
            # each prompt already prefilling there, and each request waiting here for a slot goes
            # after them (a backend's share of our queue). Under load that is what a cold prefill
            # really costs the fleet, and what a cache hit saves.
            delayed = _OWN_WORK_AGAIN + prefilling + queued_per_backend
            score = prefill_s + delayed * uncached / self.cost.prefill_rate(backend)
            options.append(_Option(backend, matched, held, uncached, prefill_s, score))
        return options

    @property
    def _ram_cache(self) -> bool:
        """Whether the backends keep a RAM prompt cache (llama-server's default ``--cache-ram``)."""
        return self.settings.ram_cache_tokens > 0

    def _copy_users(self, backend: Backend, first_block: bytes) -> list[Lease]:
        """Running requests on the backend that reused a copy of this prompt beginning: llama-server
        caches per slot, so each holds its copy until it ends, and a second request with the same
        beginning sent there meanwhile fills another slot."""
        running = self._running.get(first_block, ())
        return [lease for lease in running if lease.backend is backend and not lease.new_copy]

    def _copy_free(self, backend: Backend, first_block: bytes) -> bool:
        """Whether the backend can serve this prompt beginning from a cache now: from a slot holding
        it that no running request uses, or from the copy saved in its RAM prompt cache."""
        return self._slot_copy_free(backend, first_block) or self.index.saved(backend.name, first_block)

    def _slot_copy_free(self, backend: Backend, first_block: bytes) -> bool:
        return self.index.copies(backend.name, first_block) > len(self._copy_users(backend, first_block))

    def _copy_user(self, waiter: Waiter, backend: Backend) -> Lease | None:
        """The latest running request on the backend using the last free copy of the waiter's prompt beginning."""
        blocks = waiter.prompt.blocks
        if not blocks:
            return None
        if not self.index.copies(backend.name, blocks[0]) or self._copy_free(backend, blocks[0]):
            return None
        return max(self._copy_users(backend, blocks[0]), key=lambda lease: lease.acquired_at, default=None)

    def _decide(self, waiter: Waiter, candidates: list[Backend], now: float) -> Backend | None:
        """The free backend to grant now, or None when the waiter was parked for a busy one."""
        options = self._options(waiter, candidates, now)
        best = self._cheapest(options)
        if best.matched_blocks == 0 and waiter.prompt.blocks and waiter.pin is None:
            best = self._home(waiter, options, best)
        # Patience is counted from the moment a request declines a free slot, not from its arrival:
        # under saturation nothing is free, and waiting in line costs it nothing extra.
        patient = not waiter.patience_spent and now < waiter.deadline and self.settings.patience_max_s > 0
        pinned = self._affinity.get(waiter.pin) if waiter.pin is not None else None
        if pinned is not None:
            chosen = next((o for o in options if o.backend.name == pinned), None)
            if chosen is not None:
                return chosen.backend
            target = self._busy_target(waiter, pinned)
            if patient and target is not None:
                until = min(now + self.settings.patience_max_s, waiter.deadline)
                # its conversation is cached there
                self._park(waiter, pinned, waiter.prompt.chars, until, now, self._slot_wait_s(target))
                return None
            return best.backend
        if not patient or not waiter.prompt.blocks:
            return best.backend
        plan = self._best_wait(waiter, best, now)
        if plan is None:
            return best.backend
        held, behind, saving_s, wait_s = plan
        until = min(now + saving_s, now + self.settings.patience_max_s, waiter.deadline)
        self._park(waiter, held.backend.name, held.held_bytes, until, now, wait_s, behind=behind)
        return None

    def _park(
        self, waiter: Waiter, backend: str, saved_bytes: int, until: float | None, now: float, wait_s: float,
        *, behind: int | None = None,
    ) -> None:  # fmt: skip
        waiter.parked_at = now
        waiter.predicted_wait_s = wait_s
        self._queue.park(waiter, backend, saved_bytes, until, behind=behind)

    def _best_wait(self, waiter: Waiter, best: _Option, now: float) -> tuple[_Option, int | None, float, float] | None:
        """Whether waiting beats ``best``: for a full backend holding more of the prompt, or for a
        running request whose slot will hold more of it when it finishes. Returns the option, the
        running request's id (or None), the predicted saving and the predicted wait."""
        plans: list[tuple[float, _Option, int | None, float, float]] = []
        held = self._deepest_busy_holder(waiter, best, now)
        if held is not None and not self._common(waiter, held):
            saving_s = best.score - held.score
            wait_s = self._slot_wait_s(held.backend)
            if self._worth_waiting(held.backend, saving_s, wait_s):
                plans.append((saving_s - wait_s, held, None, saving_s, wait_s))
        running = self._running_holder(waiter, best, now)
        if running is not None and not self._common(waiter, running[1]):
            lease, option = running
            saving_s = best.score - option.score
            remaining_s = max(0.0, self.cost.service_s(lease.backend) - (now - lease.acquired_at))
            if self._worth_waiting(lease.backend, saving_s, remaining_s):
                plans.append((saving_s - remaining_s, option, id(lease), saving_s, remaining_s))
        if not plans:
            return None
        gain, option, behind, saving_s, wait_s = max(plans, key=lambda plan: plan[0])
        return (option, behind, saving_s, wait_s) if gain >= _MIN_SAVING_S else None

    def _worth_waiting(self, backend: Backend, saving_s: float, wait_s: float) -> bool:
        """Whether a predicted wait for a slot of the backend is worth its predicted saving.

        A wait longer than the patience cap ends before it pays off. And it must save
        ``1 + 4 / slots`` times its length: with few slots a wait overruns its prediction by far
        whenever a long request holds one (2 slots, ``bench.fleet``: waits behind a running
        request took a median 2x their prediction, 85x at p90), and the overruns made the tail,
        1.6-2x ``least_busy``'s there; with dozens of slots one frees soon whatever any single
        request does, and waits that only just pay are what keeps a shared prompt's prefill in hand.
        """
        margin = 1 + _WAIT_RISK_SLOTS / max(1, backend.capacity)
        return wait_s <= self.settings.patience_max_s and saving_s >= margin * wait_s

    def _slot_wait_s(self, backend: Backend) -> float:
        """Predicted wait for a slot of a busy backend, behind the requests already waiting for it."""
        return self.cost.slot_wait_s(backend, self._queue.parked_count(backend.name))

    def _common(self, waiter: Waiter, option: _Option) -> bool:
        """Whether two backends or more hold what the option holds of the prompt: a common beginning
        (a tenant's system prompt), which many requests share. Waiting for one busy holder of it
        lines them all up behind that backend's slots, a wait several times the predicted one
        (``bench.fleet``), while a prompt held once (a session's history, a long document a few
        questions share) is worth it."""
        blocks = waiter.prompt.blocks
        depth = min(len(blocks), max(1, option.held_bytes // self.settings.block_bytes))
        return len(self.index.holders(blocks[depth - 1])) >= 2

    def _running_holder(self, waiter: Waiter, best: _Option, now: float) -> tuple[Lease, _Option] | None:
        """The running request whose prompt shares the most with this one, beyond ``best``'s match."""
        prompt = waiter.prompt
        found: tuple[int, Lease] | None = None
        for lease in self._running.get(prompt.blocks[0], ()):
            if lease.backend.name in waiter.excluded or not lease.backend.serves(waiter.model):
                continue
            shared = _shared_bytes(prompt, lease, self.settings.block_bytes)
            if shared > best.held_bytes and (found is None or shared > found[0]):
                found = (shared, lease)
        if found is None:
            return None
        shared, lease = found
        option = self._options(waiter, [lease.backend], now, held_bytes=shared)[0]
        return lease, option

    def _home(self, waiter: Waiter, options: list[_Option], best: _Option) -> _Option:
        """A prompt cached nowhere goes to its home backend (a consistent hash of its first block)
        when that costs about as much as the best: prompts that share a beginning then gather on
        one backend instead of being copied to all, so the fleet's caches hold more distinct
        prompts. The cost margin keeps a popular beginning from making its home a hot spot."""
        home = self._home_of(waiter.prompt.blocks[0], waiter.model)
        for option in options:
            if option.backend is home and option.score <= best.score * (1 + _HOME_MARGIN) + _TIE_S:
                return option
        return best

    def _home_of(self, first_block: bytes, model: str | None) -> Backend:
        """The backend a prompt beginning with this block gathers on, among those serving its model
        (in a fleet of two models a home over all backends was one that cannot serve the prompt
        half the time, and those prompts had none); cached (see :func:`_jump`)."""
        home = self._homes.get((first_block, model))
        if home is None:
            if len(self._homes) >= _HOMES_CACHED:
                self._homes.clear()
            serving = self._serving_backends(model) or self._backends
            key = int.from_bytes(hashlib.blake2b(first_block, digest_size=8).digest(), "little")
            home = serving[_jump(key, len(serving))]
            self._homes[(first_block, model)] = home
        return home

    def _serving_backends(self, model: str | None) -> list[Backend]:
        """The backends serving the model, in fleet order (until a poll finds models changed)."""
        serving = self._serving.get(model)
        if serving is None:
            serving = self._serving[model] = [b for b in self._backends if b.serves(model)]
        return serving

    def _cheapest(self, options: list[_Option]) -> _Option:
        """The lowest predicted prefill; near-ties go to the least busy backend, rotating."""
        lowest = min(option.score for option in options)
        tolerance = max(_TIE_S, lowest * _TIE_SHARE)
        close = [option for option in options if option.score <= lowest + tolerance]
        if len(close) == 1:
            return close[0]
        self._turn += 1
        start = self._turn % len(close)
        rotated = close[start:] + close[:start]
        return min(rotated, key=lambda option: option.backend.load)

    def _busy_target(self, waiter: Waiter, name: str) -> Backend | None:
        backend = self._by_name.get(name)
        if backend is None or not backend.routable or not backend.serves(waiter.model) or name in waiter.excluded:
            return None
        return backend

    def _deepest_busy_holder(self, waiter: Waiter, best: _Option, now: float) -> _Option | None:
        """A busy backend holding more of the prompt than the best free one, if any."""
        prompt = waiter.prompt
        blocks = prompt.blocks
        deeper = set(self.index.holders(blocks[best.matched_blocks])) if best.matched_blocks < len(blocks) else set()
        deeper |= self.index.end_holders(prompt.marks, best.held_bytes)
        if not deeper:
            return None
        busy = [
            b
            for b in map(self._by_name.__getitem__, deeper)
            if (b.free < min(waiter.weight, max(1, b.capacity)) or not self._accepting(b, now)) and b.routable
            and b.serves(waiter.model) and b.name not in waiter.excluded
        ]  # fmt: skip
        options = [o for o in self._options(waiter, busy, now) if o.held_bytes > best.held_bytes]
        return min(options, key=lambda o: o.score) if options else None

    # -- grants and releases ----------------------------------------------------------------

    def _grant(self, waiter: Waiter, backend: Backend, now: float) -> None:
        weight = min(waiter.weight, backend.capacity)
        lease = Lease(backend, self._release, weight)
        blocks = waiter.prompt.blocks
        tokens_per_char = self.cost.tokens_per_char(waiter.model)
        prompt_tokens = max(1.0, waiter.prompt.chars * tokens_per_char)
        slot_copy = bool(blocks) and self._slot_copy_free(backend, blocks[0])
        # Without a free slot copy, llama-server moves the RAM cache's copy into the slot it takes.
        from_ram = bool(blocks) and not slot_copy and self.index.take_saved(backend.name, blocks[0])
        # Slots our running tasks took without holding their prompts (this one's included): the
        # prompts they held before are overwritten.
        taking = 0 if slot_copy else sum(other.weight for other in backend.leases if other.new_copy) + weight
        self.index.task_started(
            backend.name, blocks[0] if blocks else None, reused_copy=slot_copy, taking=taking,
            in_use=lambda block: len(self._copy_users(backend, block)), ram_cache=self._ram_cache,
        )  # fmt: skip
        matched = self.index.match(backend.name, blocks) if slot_copy or from_ram else 0
        held = self.index.held_bytes(backend.name, waiter.prompt.marks, matched, self.settings.block_bytes)
        lease.new_copy = matched == 0 or from_ram
        lease.prompt_chars = waiter.prompt.chars
        lease.prompt_tokens = prompt_tokens
        lease.expected_cached_tokens = min(prompt_tokens - 1, held * tokens_per_char)
        lease.uncached_tokens = prompt_tokens - lease.expected_cached_tokens
        lease.predicted_prefill_s = self.cost.prefill_s(backend, lease.uncached_tokens, now)
        lease.loads_model = backend.state is BackendState.UNLOADED
        lease.affinity = self._affinity_outcome(waiter, backend, matched)
        self._typical_wait_s += _WAIT_ALPHA * ((now - waiter.enqueued_at) - self._typical_wait_s)
        if waiter.parked_at is not None:
            self._stats.parked += 1
            self._stats.parked_wait_s += now - waiter.parked_at
            self._stats.parked_wait_predicted_s += waiter.predicted_wait_s
            waiter.parked_at = None  # (a grant shared mode refuses is made again: counted once)
        if waiter.pin is not None:
            self._affinity.set(waiter.pin, backend.name)
            if self.shared is not None:
                self.shared.pinned(waiter.pin, backend.name)
        if blocks:
            lease.blocks = blocks
            lease.end = waiter.prompt.end
            self._running.setdefault(blocks[0], set()).add(lease)
        if lease.loads_model:
            lease.on_first_byte = functools.partial(self._model_loaded, backend)
        elif self.settings.cost_aware:
            lease.on_first_byte = functools.partial(self._prefill_done, backend)
        if self.settings.cost_aware:
            self._wake_at(lease.prefill_deadline)
        self._seen_open.discard(backend)
        backend.in_flight += weight
        backend.requests += 1
        backend.leases.add(lease)
        self._stats.dispatched += 1
        self.leases.add(lease)
        waiter.grant.give(lease)

    def _affinity_outcome(self, waiter: Waiter, backend: Backend, matched: int) -> str | None:
        if waiter.pin is not None:
            pinned = self._affinity.get(waiter.pin)
            outcome = "new" if pinned is None else ("hit" if pinned == backend.name else "miss")
        elif not waiter.prompt.blocks:
            return None
        else:
            holders = self.index.holders(waiter.prompt.blocks[matched]) if matched < len(waiter.prompt.blocks) else ()
            known = matched > 0 or bool(self.index.holders(waiter.prompt.blocks[0]))
            outcome = "new" if not known else ("miss" if holders else "hit")
        if outcome == "hit":
            self._stats.affinity_hits += 1
        elif outcome == "miss":
            self._stats.affinity_misses += 1
        return outcome

    def _release(self, lease: Lease) -> None:
        backend = lease.backend
        self.leases.discard(lease)
        backend.leases.discard(lease)
        self._seen_open.discard(backend)  # its prefill rate is learned again below
        self._open(backend)
        backend.in_flight -= lease.weight
        assert backend.in_flight >= 0, "a lease was released twice"
        if self.shared is not None:
            self.shared.released(lease)
        if lease.refused:
            # Shared mode refused it before anything was sent: the waiter queues again.
            backend.requests -= 1
            self._stats.dispatched -= 1
            self._forget_running(lease)
            self.dispatch()
            return
        if lease.blocks:
            self._forget_running(lease)
            # The slot that served it now holds its prompt, and can serve what shares it.
            ram = self._ram_cache
            self.index.insert(backend.name, lease.blocks, lease.end, new_copy=lease.new_copy, ram_cache=ram)
            if self.shared is not None:
                self.shared.indexed(backend.name, lease.blocks, lease.end, new_copy=lease.new_copy, ram_cache=ram)
        else:
            self.index.untracked_prompt(backend.name, ram_cache=self._ram_cache)
        self._learn(lease)
        self.dispatch()

    def _forget_running(self, lease: Lease) -> None:
        if not lease.blocks:
            return
        running = self._running.get(lease.blocks[0])
        if running is not None:
            running.discard(lease)
            if not running:
                del self._running[lease.blocks[0]]
        self._queue.finished(id(lease))

    def _learn(self, lease: Lease) -> None:
        backend = lease.backend
        timings = lease.timings
        if not lease.loads_model:
            self.cost.learn_service(backend, time.monotonic() - lease.acquired_at)
        elif lease.first_byte_at is not None:
            # Its time to the first byte was the model loading, not the backend's speed.
            self.cost.learn_load(backend, lease.first_byte_at - lease.acquired_at)
        if timings is None:
            return
        prompt_tokens = timings.cache_n + timings.prompt_n
        self.cost.learn_prefill(backend, timings.prompt_n, timings.prompt_ms)
        self.cost.learn_prompt(None, lease.prompt_chars, prompt_tokens)
        backend.prompt_tokens += prompt_tokens
        backend.cached_tokens += timings.cache_n
        backend.expected_cached_tokens += lease.expected_cached_tokens
        self._stats.prompt_tokens += prompt_tokens
        self._stats.cached_tokens += timings.cache_n
        self._stats.expected_cached_tokens += lease.expected_cached_tokens
        if lease.first_byte_at is not None:
            actual = lease.first_byte_at - lease.acquired_at
            self._stats.ttft_prediction_error_s += abs(actual - lease.predicted_prefill_s)
            self._stats.ttft_predictions += 1
        block_tokens = self.settings.block_bytes * self.cost.tokens_per_char(None)
        self.index.observe(
            backend.name, int(lease.expected_cached_tokens / block_tokens), int(timings.cache_n / block_tokens)
        )

    # -- patience timer ---------------------------------------------------------------------

    def _model_loaded(self, backend: Backend) -> None:
        """The request that loaded a router's model got its first byte: read the model's slots now."""
        if self.model_loaded is not None:
            self.model_loaded(backend)
        self._prefill_done(backend)

    def _prefill_done(self, backend: Backend) -> None:
        """A backend finished a prompt: it may take the next request."""
        self._open(backend)
        if len(self._queue):
            self.dispatch()

    def _wake_at(self, at: float) -> None:
        heapq.heappush(self._wakes, at)

    def _arm_timer(self) -> None:
        now = time.monotonic()
        while self._wakes and self._wakes[0] <= now:
            heapq.heappop(self._wakes)
        patience = self._queue.next_patience_end()
        wake = self._wakes[0] if self._wakes and len(self._queue) else None
        at = min((t for t in (patience, wake) if t is not None), default=None)
        if at is None or at >= self.alarm.at:
            return
        self.alarm.set(at + 0.001)

    def close(self) -> None:
        self.alarm.cancel()
