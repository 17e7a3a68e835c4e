from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llamacpp_ha import BackendState, Balancer, RouteInfo

__all__ = ["ServerMetrics"]

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """Prometheus metrics of one server app, in a registry of its own (two apps share nothing)."""

    def __init__(self, balancer: Balancer) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "llamacpp_ha_requests",
            "Proxied requests by backend, requested model, status and API key name.",
            ["backend", "model", "status", "key"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "llamacpp_ha_queue_wait_seconds",
            "Time requests waited in the balancer's queue for a free slot.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_byte = Histogram(
            "llamacpp_ha_time_to_first_byte_seconds",
            "Time from receiving a request to sending the first byte of its response body.",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(balancer))

    def observe_request(self, info: RouteInfo | None, status: int, key: str) -> None:
        backend = info.backend if info is not None else "-"
        model = (info.model or "-") if info is not None else "-"
        self.requests.labels(backend, model, str(status), key).inc()
        if info is not None:
            self.queue_wait.observe(info.queued_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Reads the balancer's snapshot at scrape time."""

    def __init__(self, balancer: Balancer) -> None:
        self._balancer = balancer

    def collect(self) -> Iterator[Metric]:
        snapshot = self._balancer.snapshot()
        yield GaugeMetricFamily("llamacpp_ha_queue_depth", "Requests waiting for a slot.", value=snapshot.queue_depth)
        in_flight = GaugeMetricFamily(
            "llamacpp_ha_backend_in_flight", "Slots held by this balancer.", labels=["backend"]
        )
        capacity = GaugeMetricFamily("llamacpp_ha_backend_capacity", "Slots of the backend.", labels=["backend"])
        busy = GaugeMetricFamily(
            "llamacpp_ha_backend_busy",
            "Busy slots seen by the last /slots poll (all clients).",
            labels=["backend"],
        )
        state = GaugeMetricFamily(
            "llamacpp_ha_backend_state", "1 for the backend's current state.", labels=["backend", "state"]
        )
        requests = CounterMetricFamily(
            "llamacpp_ha_backend_dispatched", "Slots granted on the backend.", labels=["backend"]
        )
        errors = CounterMetricFamily(
            "llamacpp_ha_backend_errors", "Failed attempts and cut responses.", labels=["backend"]
        )
        for backend in snapshot.backends:
            in_flight.add_metric([backend.name], backend.in_flight)
            capacity.add_metric([backend.name], backend.capacity)
            if backend.busy is not None:
                busy.add_metric([backend.name], backend.busy)
            for each_state in BackendState:
                state.add_metric([backend.name, each_state.value], 1.0 if backend.state == each_state else 0.0)
            requests.add_metric([backend.name], backend.requests)
            errors.add_metric([backend.name], backend.errors)
        yield from (in_flight, capacity, busy, state, requests, errors)
        shared = snapshot.shared
        if shared is not None:
            fleet = GaugeMetricFamily(
                "llamacpp_ha_backend_shared_in_flight",
                "Slots every balancer sharing the fleet holds on the backend (Redis).",
                labels=["backend"],
            )
            for backend in snapshot.backends:
                if backend.shared_in_flight is not None:
                    fleet.add_metric([backend.name], backend.shared_in_flight)
            yield fleet
            yield GaugeMetricFamily(
                "llamacpp_ha_shared_mode", "1 while admission is shared through Redis, 0 when local.",
                value=1.0 if shared.state == "shared" else 0.0,
            )  # fmt: skip
            yield GaugeMetricFamily(
                "llamacpp_ha_shared_replicas", "Balancers with a live heartbeat in Redis.", value=len(shared.replicas)
            )
            yield CounterMetricFamily(
                "llamacpp_ha_shared_fallbacks", "Times Redis became unreachable and admission went local.",
                value=shared.fallbacks,
            )  # fmt: skip
            yield CounterMetricFamily(
                "llamacpp_ha_shared_refused", "Local grants refused by Redis: other balancers held the slots.",
                value=shared.refused,
            )  # fmt: skip
            yield CounterMetricFamily(
                "llamacpp_ha_shared_deferred", "Freed slots left to an older waiter of another balancer.",
                value=shared.deferred,
            )  # fmt: skip
        counters = snapshot.counters
        for name, value, help_text in (
            ("retries", counters.retries, "Requests sent again after a failure before any response byte."),
            ("affinity_hits", counters.affinity_hits, "Requests that went to their conversation's backend."),
            ("affinity_misses", counters.affinity_misses, "Requests whose conversation's backend was full."),
            ("queue_timeouts", counters.queue_timeouts, "Requests that waited queue_timeout_s in vain."),
            ("queue_rejections", counters.queue_rejections, "Requests refused because the queue was full."),
            ("parked", counters.parked, "Requests that waited for a busy backend holding their prompt."),
            ("parked_wait_seconds", counters.parked_wait_s, "How long those requests waited for it."),
            ("parked_wait_predicted_seconds", counters.parked_wait_predicted_s, "How long they were predicted to."),
            ("patience_ran_out", counters.patience_ran_out, "Waits for a busy backend that reached their patience."),
        ):
            yield CounterMetricFamily(f"llamacpp_ha_{name}", help_text, value=value)
