"""What a balancer shows of itself: JSON-serializable snapshots of the fleet and its counters.

Pydantic models, loaded when a snapshot is first taken (not by ``import llamacpp_ha``).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal

from pydantic import BaseModel

from ._backend import Backend, BackendState
from ._stats import Stats

__all__ = [
    "BackendSnapshot",
    "BalancerSnapshot",
    "Counters",
    "SharedSnapshot",
    "SharedState",
    "snapshot_backend",
    "snapshot_counters",
]

SharedState = Literal["connecting", "shared", "local"]


class Counters(BaseModel):
    requests: int
    dispatched: int
    retries: int
    affinity_hits: int
    affinity_misses: int
    queue_timeouts: int
    queue_rejections: int
    bad_requests: int
    models_not_found: int
    failovers_exhausted: int
    no_backend: int
    stream_failures: int
    expired_leases: int
    queue_wait_total_s: float
    queue_wait_max_s: float
    prompt_tokens: int
    cached_tokens: int
    expected_cached_tokens: float
    ttft_predictions: int
    ttft_prediction_error_s: float
    parked: int
    """Requests that waited for a busy backend holding their prompt (counted at their grant)."""
    parked_wait_s: float
    """Sum of those waits: against ``parked_wait_predicted_s``, whether waiting for caches pays."""
    parked_wait_predicted_s: float
    patience_ran_out: int
    """Of the waits for a busy backend, those that reached their patience."""


class BackendSnapshot(BaseModel):
    name: str
    url: str
    state: BackendState
    reason: str
    routable: bool
    """Healthy with at least one slot: requests may be sent to it (the one notion of routable)."""
    sleeping: bool
    capacity: int
    in_flight: int
    """Slots held by this balancer's requests."""
    busy: int | None
    """Slots the last ``/slots`` poll saw processing (ours and other clients'); None without ``/slots``."""
    external: int
    """Busy slots not ours, as of the last poll."""
    free: int
    models: list[str]
    requests: int
    errors: int
    prefill_tokens_per_s: float | None
    """Learned prefill rate; None until a response reported one."""
    cached_share: float | None
    """Share of prompt tokens this backend served from cache; None before any response."""
    expected_cached_share: float | None
    """The share the prefix index expected for the same responses."""
    index_blocks: int
    """Prompt blocks the prefix index believes this backend holds."""
    shared_in_flight: int | None = None
    """Slots every balancer sharing the fleet holds here, as Redis last said (shared mode only)."""
    is_router: bool = False
    """A router-mode server: it has no slots of its own; each of its models is a backend."""
    router: str | None = None
    """Set on a router's model: the name of the router serving it."""
    load_s: float | None = None
    """A router's model: learned time to load it; None until a request of ours loaded it."""


class SharedSnapshot(BaseModel):
    """Shared mode as this balancer sees it."""

    url: str
    """Redis, with any password redacted."""
    state: SharedState
    """``shared``: admission through Redis; ``local``: Redis unreachable, counting locally."""
    reason: str
    replica: str
    """This balancer's id among the replicas."""
    replicas: list[str]
    """Balancers that renewed their heartbeat within ``lease_ttl_s`` (this one included)."""
    fallbacks: int
    """Times Redis stopped answering and admission fell back to local counting."""
    refused: int
    """Local grants Redis refused: other balancers held the backend's slots, or had older waiters."""
    deferred: int
    """Of those, grants left to an older waiter of another balancer (fleet-wide arrival order)."""


class BalancerSnapshot(BaseModel):
    """The state of the fleet and the balancer at one moment; JSON-serializable."""

    policy: str
    backends: list[BackendSnapshot]
    queue_depth: int
    affinity_entries: int
    counters: Counters
    shared: SharedSnapshot | None = None
    """Shared mode (Redis) as this balancer sees it; None when it balances on its own."""

    @property
    def in_flight(self) -> int:
        return sum(backend.in_flight for backend in self.backends)

    def backend(self, name: str) -> BackendSnapshot:
        return next(backend for backend in self.backends if backend.name == name)


def snapshot_backend(backend: Backend, index_blocks: int = 0) -> BackendSnapshot:
    prompt = backend.prompt_tokens
    return BackendSnapshot(
        name=backend.name,
        url=backend.display_url,
        state=backend.state,
        reason=backend.reason,
        routable=backend.routable,
        sleeping=backend.sleeping,
        capacity=backend.capacity,
        in_flight=backend.in_flight,
        busy=backend.observed_busy,
        external=backend.external,
        free=backend.free_slots,
        models=list(backend.model_ids),
        requests=backend.requests,
        errors=backend.errors,
        prefill_tokens_per_s=backend.prefill_rate,
        cached_share=backend.cached_tokens / prompt if prompt else None,
        expected_cached_share=backend.expected_cached_tokens / prompt if prompt else None,
        index_blocks=index_blocks,
        shared_in_flight=backend.shared_total,
        is_router=backend.is_router,
        router=backend.router.name if backend.router is not None else None,
        load_s=backend.load_s,
    )


def snapshot_counters(stats: Stats) -> Counters:
    return Counters(**asdict(stats))
