"""A balancer's counters (plain fields: counted on the request path)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Stats"]


@dataclass(slots=True)
class Stats:
    """Counters of one balancer (never shared between balancers)."""

    requests: int = 0
    """Inference requests accepted for routing."""
    dispatched: int = 0
    """Slots granted, including retries."""
    retries: int = 0
    """Requests sent again after a failure before any response byte."""
    affinity_hits: int = 0
    affinity_misses: int = 0
    """The conversation's backend was known but had no free slot, so another one served it."""
    queue_timeouts: int = 0
    queue_rejections: int = 0
    bad_requests: int = 0
    models_not_found: int = 0
    failovers_exhausted: int = 0
    no_backend: int = 0
    """Requests refused at once because every backend that serves their model was down."""
    stream_failures: int = 0
    """Responses cut off by the backend after they started."""
    expired_leases: int = 0
    """Responses closed because their consumer stopped reading for ``stream_idle_timeout_s``."""
    queue_wait_total_s: float = 0.0
    queue_wait_max_s: float = 0.0
    prompt_tokens: int = 0
    """Prompt tokens of finished responses, as the backends reported them."""
    cached_tokens: int = 0
    """Of those, served from a backend's prompt cache (``timings.cache_n``)."""
    expected_cached_tokens: float = 0.0
    """What the prefix index expected to be cached for the same responses."""
    ttft_predictions: int = 0
    ttft_prediction_error_s: float = 0.0
    """Sum of |predicted - actual| time from dispatch to the first byte."""
    parked: int = 0
    """Requests that waited for a busy backend holding their prompt instead of taking a free slot
    elsewhere, or finding none, queued for it (counted when they were granted a slot)."""
    parked_wait_s: float = 0.0
    """Sum of how long those requests waited, from the decision to wait to their grant."""
    parked_wait_predicted_s: float = 0.0
    """Sum of how long those waits were predicted to last when they began."""
    patience_ran_out: int = 0
    """Waits for a busy backend that reached their patience: the request went back to arrival order."""

    def record_wait(self, waited_s: float) -> None:
        self.queue_wait_total_s += waited_s
        self.queue_wait_max_s = max(self.queue_wait_max_s, waited_s)
