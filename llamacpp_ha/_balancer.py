from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import httpx2

from ._affinity import AffinityTable
from ._backend import Backend, BackendState
from ._config import BalancerConfig
from ._errors import (
    BalancerClosedError,
    ContextLengthError,
    ModelNotFoundError,
    NoBackendError,
    QueueFullError,
    QueueTimeoutError,
)
from ._leases import Lease
from ._policies import make_policy
from ._poller import Poller
from ._queue import Grant, Waiter, WaitQueue
from ._registry import Registry
from ._request import RequestFacts
from ._scheduler import Scheduler, SchedulerSettings
from ._stats import Stats

if TYPE_CHECKING:
    from ._shared import SharedFleet, Ticket
    from ._snapshot import BalancerSnapshot

__all__ = ["CONTEXT_MARGIN", "Balancer"]

CONTEXT_MARGIN = 0.25
"""How far below the learned tokens-per-character a prompt may be and still be refused as too long."""

logger = logging.getLogger("llamacpp_ha")


class Balancer:
    """The engine: backend registry, slot accounting, global queue, scheduler and affinity.

    Starts its background polling on first use in the running event loop and stops it in
    :meth:`aclose`; nothing is shared with any other balancer.
    """

    def __init__(self, config: BalancerConfig, *, poll_transport: httpx2.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self._poll_transport = poll_transport
        self.backends = [Backend(backend) for backend in config.backends]
        self.stats = Stats()
        self.queue = WaitQueue()
        self.affinity = AffinityTable(config.affinity_ttl_s, config.affinity_max_entries)
        settings = SchedulerSettings(
            cost_aware=config.policy == "affinity",
            block_bytes=config.prefix_block_bytes,
            patience_max_s=config.patience_max_s,
            prefill_backlog_s=config.prefill_backlog_s,
            ram_cache_tokens=config.ram_cache_tokens,
        )
        policy = make_policy(config.policy)
        self.scheduler = Scheduler(self.backends, self.queue, policy, self.affinity, self.stats, settings)
        self.shared: SharedFleet | None = None
        """Set when ``config.shared`` names a Redis: slot leases, index and pins shared with peers."""
        if config.shared is not None:
            from ._shared import SharedFleet

            self.shared = SharedFleet(
                config.shared,
                self.backends,
                self.scheduler.index,
                self.affinity,
                self.scheduler.dispatch,
                wait_expiry_s=2 * config.queue_timeout_s,
            )
            self.scheduler.shared = self.shared
        self._registry_instance: Registry | None = None
        self._poller = Poller(self, self.scheduler.alarm)
        self.scheduler.model_loaded = self._poller.wake
        self._polled: anyio.Event | None = None
        """Set once every backend was polled (made by the first start())."""
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def backend(self, name: str) -> Backend:
        return next(backend for backend in self.backends if backend.name == name)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start polling now and wait for the first poll (otherwise the first request does this)."""
        if self._closed:
            raise BalancerClosedError("The balancer is closed.")
        if self.shared is not None:
            self.shared.check_event_loop()
        self._poller.start()
        if self.shared is not None:
            await self.shared.start()
        if not self._all_polled():
            self._polled = self._polled or anyio.Event()
            with anyio.move_on_after(self.config.poll_timeout_s * 3):
                await self._polled.wait()

    async def aclose(self) -> None:
        """Stop polling, fail waiting requests with 503, and close connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.scheduler.close()
        for waiter in self.queue.drain():
            waiter.grant.fail(BalancerClosedError("The balancer was closed while the request waited."))
        await self._poller.aclose()
        if self._registry_instance is not None:
            await self._registry_instance.aclose()
            self._registry_instance = None
        if self.shared is not None:
            await self.shared.aclose()

    async def poll_now(self) -> None:
        """Poll every backend once, then dispatch what the new state allows."""
        async with anyio.create_task_group() as group:
            for backend in self.backends:
                if backend.router is None:
                    group.start_soon(self.poll_backend, backend)

    async def poll_backend(self, backend: Backend) -> None:
        """Poll one backend (a router with its models) and act on the result at once."""
        try:
            await self._registry().poll(backend)
        except Exception:
            logger.exception("polling backend %s failed", backend.name)
        backend.polled = True
        self._adopt(backend.children.values())
        if self._polled is not None and self._all_polled():
            self._polled.set()
        self.scheduler.backends_changed()

    def _all_polled(self) -> bool:
        return all(backend.polled for backend in self.backends)

    def _adopt(self, children: Iterable[Backend]) -> None:
        """A router listed models not seen before: each becomes a backend to route to."""
        for child in children:
            if not child.polled:
                child.polled = True
                self.backends.append(child)
                self.scheduler.backend_added(child)
                if self.shared is not None:
                    self.shared.backend_added(child)

    def _registry(self) -> Registry:
        if self._registry_instance is None:
            client = httpx2.AsyncClient(transport=self._poll_transport, limits=httpx2.Limits(keepalive_expiry=4.0))
            self._registry_instance = Registry(client, self.config.poll_timeout_s)
        return self._registry_instance

    def wake_poller(self, backend: Backend) -> None:
        """Poll this backend (a router's model: its router) now instead of at its next interval; no other."""
        self._poller.wake(backend)

    def resolve_model(self, model: str | None) -> str | None:
        """The queue key for a requested model: the name itself, or None for "any backend"."""
        if model is None or any(backend.serves(model) for backend in self.backends):
            return model
        if self.config.allow_unknown_models:
            return None
        if not all(backend.models_known for backend in self.backends):
            return model  # some backend has not said what it serves yet: wait for it
        self.stats.models_not_found += 1
        available = ", ".join(self.model_ids()) or "none"
        raise ModelNotFoundError(f"The model '{model}' does not exist on any backend. Available models: {available}.")

    def could_serve(self, model: str | None, excluded: set[str]) -> bool:
        """Whether a healthy backend outside ``excluded`` serves the model (a retry may wait for it)."""
        key = self.resolve_model(model)
        return any(b.routable and b.serves(key) and b.name not in excluded for b in self.backends)

    def model_ids(self) -> list[str]:
        """Model ids served by routable backends (a router's unloaded models too), in backend order, each once."""
        ids: dict[str, None] = {}
        for backend in self.backends:
            if backend.routable:
                ids.update(dict.fromkeys(backend.model_ids))
        return list(ids)

    def models_payload(self) -> dict[str, Any]:
        """``GET /v1/models`` in OpenAI's list shape, answered from the registry."""
        owners: dict[str, list[str]] = {}
        for backend in self.backends:
            if backend.routable:
                for model_id in backend.model_ids:
                    owners.setdefault(model_id, []).append(backend.name)
        data = [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "llamacpp", "backends": names}
            for model_id, names in owners.items()
        ]
        return {"object": "list", "data": data}

    async def acquire(
        self,
        facts: RequestFacts,
        *,
        excluded: frozenset[str] = frozenset(),
        seq: int | None = None,
        deadline: float | None = None,
    ) -> Lease:
        """Wait for a slot on a backend that serves the request's model.

        ``seq`` and ``deadline`` carry a retried request's place in the queue and its original
        deadline. Raises a :class:`~llamacpp_ha.BalancerError` when no slot can be had.
        """
        if not self._poller.running:
            await self.start()
        if self._closed:
            raise BalancerClosedError("The balancer is closed.")
        model = self.resolve_model(facts.model)
        if not excluded:
            self._check_servable(model, facts)
        now = time.monotonic()
        deadline = deadline if deadline is not None else now + self.config.queue_timeout_s
        seq = self.queue.next_seq() if seq is None else seq
        shared = self.shared
        if shared is None:
            lease = await self._wait_for_slot(facts, model, excluded, seq, deadline, requeued=False)
        else:
            lease = await self._admitted(shared, facts, model, excluded, seq, deadline)
        self.stats.record_wait(time.monotonic() - now)
        return lease

    async def _admitted(
        self,
        shared: SharedFleet,
        facts: RequestFacts,
        model: str | None,
        excluded: frozenset[str],
        seq: int,
        deadline: float,
    ) -> Lease:
        """A slot granted here and admitted in Redis: other balancers' leases and older waiters count."""
        ticket = shared.ticket(seq, model)
        first_deferred: float | None = None
        requeued = False
        try:
            while True:
                lease = await self._wait_for_slot(
                    facts, model, excluded, seq, deadline, requeued=requeued, ticket=ticket
                )
                force = first_deferred is not None and time.monotonic() - first_deferred >= shared.order_grace_s
                try:
                    admission = await shared.admit(lease, ticket, force=force)
                except BaseException:
                    lease.release()
                    raise
                if admission == "admitted":
                    return lease
                # Other balancers hold that backend's slots, or wait longer for one: wait again,
                # in the same place in line.
                lease.refused = True
                lease.release()
                requeued = True
                if admission == "deferred":
                    first_deferred = first_deferred or time.monotonic()
        finally:
            shared.done_waiting(ticket)

    async def _wait_for_slot(
        self,
        facts: RequestFacts,
        model: str | None,
        excluded: frozenset[str],
        seq: int,
        deadline: float,
        *,
        requeued: bool,
        ticket: Ticket | None = None,
    ) -> Lease:
        now = time.monotonic()
        grant = Grant()
        waiter = Waiter(
            seq,
            model,
            grant,
            now,
            prompt=facts.prompt,
            pin=facts.pin,
            excluded=excluded,
            deadline=deadline,
        )
        self.queue.push(waiter)
        self.scheduler.dispatch()
        if not grant.done():
            self.scheduler.queued(waiter)
        if not grant.done() and not excluded and not requeued and len(self.queue) > self.config.max_queue:
            # Only requests that must wait count against the bound (a retry keeps its place).
            self._give_up(waiter)
            self.stats.queue_rejections += 1
            raise QueueFullError(
                f"{len(self.queue)} requests are already waiting for a slot (max_queue).",
                retry_after_s=self._retry_after_s(),
            )
        if not grant.done():
            if ticket is not None and self.shared is not None:
                self.shared.waiting(ticket)
            try:
                with anyio.fail_after(deadline - time.monotonic()):
                    return await grant.wait()
            except TimeoutError:
                self._give_up(waiter)
                self.stats.queue_timeouts += 1
                raise QueueTimeoutError(
                    f"No slot became free within {self.config.queue_timeout_s:g} s "
                    f"({len(self.queue)} requests waiting).",
                    retry_after_s=self._retry_after_s(),
                ) from None
            except BaseException:
                self._give_up(waiter)
                raise
        return grant.result()

    def _check_servable(self, model: str | None, facts: RequestFacts) -> None:
        """Fail at once what waiting cannot fix: every backend down, or a prompt too long for all."""
        serving = [b for b in self.backends if b.serves(model)]
        if not serving or any(b.routable for b in serving):
            self._check_context(serving, model, facts)
            return
        now = time.monotonic()
        grace = self.config.down_grace_s
        for backend in serving:
            if backend.state is BackendState.UNLOADED:
                continue  # not routable, so its router does not autoload: only its operator can load it
            if backend.state is not BackendState.DEAD or now - backend.state_since < grace:
                return  # loading, not polled yet, or just died: a restart may be under way
        self.stats.no_backend += 1
        reasons = "; ".join(f"{b.name}: {b.state} ({b.reason})" for b in serving)
        raise NoBackendError(f"No backend can serve {model or 'this request'} now: {reasons}.")

    def _check_context(self, serving: list[Backend], model: str | None, facts: RequestFacts) -> None:
        cost = self.scheduler.cost
        contexts = [b.n_ctx for b in serving if b.routable]
        if not contexts or None in contexts or not cost.learned_tokens_per_char(model):
            return
        largest = max(c for c in contexts if c is not None)
        # The estimate comes from a learned average: refuse only when even 25% fewer tokens per
        # character than average would not fit, so a prompt near the limit still goes through.
        low = facts.prompt.chars * cost.tokens_per_char(model) * (1 - CONTEXT_MARGIN)
        if low > largest:
            self.stats.bad_requests += 1
            raise ContextLengthError(
                f"The prompt is about {low / (1 - CONTEXT_MARGIN):.0f} tokens, more than the context of "
                f"every backend serving {model or 'it'} (at most {largest} per slot)."
            )

    def _give_up(self, waiter: Waiter) -> None:
        lease = waiter.grant.abandon()
        if lease is not None:
            lease.release()  # granted in the same instant the waiter gave up: the slot goes back
        self.queue.forget(waiter)

    def _retry_after_s(self) -> float:
        return max(1.0, min(self.config.queue_timeout_s, 30.0))

    def __repr__(self) -> str:
        from ._display import render_text  # only for people looking: not on every import

        return render_text(self.snapshot())

    def _repr_html_(self) -> str:
        from ._display import render_html

        return render_html(self.snapshot())

    def snapshot(self) -> BalancerSnapshot:
        """The fleet and the balancer's counters now, as a JSON-serializable model."""
        from ._snapshot import BalancerSnapshot, snapshot_backend, snapshot_counters

        return BalancerSnapshot(
            policy=self.config.policy,
            # Each router's models right after it.
            backends=[
                snapshot_backend(each, self.scheduler.index.size(each.name))
                for b in self.backends
                if b.router is None
                for each in (b, *b.children.values())
            ],
            queue_depth=len(self.queue),
            affinity_entries=len(self.affinity),
            counters=snapshot_counters(self.stats),
            shared=self.shared.snapshot() if self.shared is not None else None,
        )
