"""The ways of spreading requests over a fleet that the fleet benchmark compares."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx2

from llamacpp_ha import BackendConfig, BalancerConfig, HAAsyncClient, ha_client

__all__ = ["STRATEGIES", "Strategy", "make_strategy"]

_LIMITS = httpx2.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=4.0)


class Strategy:
    """Sends a chat request to one backend and streams the answer."""

    name = ""
    description = ""

    async def start(self, urls: list[str], *, ram_cache_tokens: int | None = None, time_scale: float = 1.0) -> None:
        """``ram_cache_tokens``: what each backend's RAM prompt cache holds, as an operator would
        configure it for llamacpp-ha (None: its default, llama-server's default ``--cache-ram``).
        ``time_scale``: how much faster than real time the backends run (a simulation sped up):
        the balancer's time limits are divided by it, so that they act as they would in real time."""
        raise NotImplementedError

    def stream(self, body: dict[str, Any]) -> contextlib.AbstractAsyncContextManager[httpx2.Response]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        """What the strategy itself saw (llamacpp-ha's counters), for the benchmark's notes."""
        return {}


class _Immediate(Strategy):
    """A plain reverse proxy: pick a backend and send at once (llama-server queues internally)."""

    def __init__(self) -> None:
        self._clients: list[httpx2.AsyncClient] = []
        self._in_flight: list[int] = []
        self._turn = 0

    async def start(self, urls: list[str], *, ram_cache_tokens: int | None = None, time_scale: float = 1.0) -> None:
        self._clients = [httpx2.AsyncClient(base_url=url, timeout=600, limits=_LIMITS) for url in urls]
        self._in_flight = [0] * len(urls)

    def _pick(self) -> int:
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def stream(self, body: dict[str, Any]) -> AsyncIterator[httpx2.Response]:
        index = self._pick()
        self._in_flight[index] += 1
        try:
            async with self._clients[index].stream("POST", "/v1/chat/completions", json=body) as response:
                yield response
        finally:
            self._in_flight[index] -= 1

    async def close(self) -> None:
        for client in self._clients:
            await client.aclose()


class RoundRobinImmediate(_Immediate):
    name = "round_robin"
    description = "round robin, sent at once (a plain reverse proxy)"

    def _pick(self) -> int:
        self._turn += 1
        return self._turn % len(self._clients)


class LeastConnectionsImmediate(_Immediate):
    name = "least_conn"
    description = "least connections, sent at once (nginx least_conn)"

    def _pick(self) -> int:
        self._turn += 1
        n = len(self._clients)
        return min(((self._turn + i) % n for i in range(n)), key=self._in_flight.__getitem__)


class Balanced(Strategy):
    """llamacpp-ha in-process: slot-aware global queue with one of its policies."""

    def __init__(self, policy: str, name: str, description: str, **settings: Any) -> None:
        self._policy = policy
        self._settings = settings
        """Balancer settings that differ from the defaults (``BalancerConfig`` fields)."""
        self.name = name
        self.description = description
        self._client: HAAsyncClient | None = None

    async def start(self, urls: list[str], *, ram_cache_tokens: int | None = None, time_scale: float = 1.0) -> None:
        config = BalancerConfig(
            backends=[BackendConfig(url=url) for url in urls],
            policy=self._policy,  # type: ignore[arg-type]
            queue_timeout_s=600,
            max_queue=100_000,
            poll_interval_s=0.5,
            **self._settings,
        )
        if ram_cache_tokens is not None:
            config = config.model_copy(update={"ram_cache_tokens": ram_cache_tokens})
        if time_scale != 1.0:
            backlog = config.prefill_backlog_s
            config = config.model_copy(
                update={
                    "patience_max_s": config.patience_max_s / time_scale,
                    "prefill_backlog_s": None if backlog is None else backlog / time_scale,
                }
            )
        self._client = ha_client(config, timeout=600)
        await self._client.balancer.start()

    def stream(self, body: dict[str, Any]) -> contextlib.AbstractAsyncContextManager[httpx2.Response]:
        assert self._client is not None
        return self._client.stream("POST", "/v1/chat/completions", json=body)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def report(self) -> dict[str, Any]:
        if self._client is None:
            return {}
        counters = self._client.balancer.snapshot().counters
        prompt = counters.prompt_tokens or 1
        return {
            "affinity_hits": counters.affinity_hits,
            "affinity_misses": counters.affinity_misses,
            "cached_share": counters.cached_tokens / prompt,
            "expected_cached_share": counters.expected_cached_tokens / prompt,
            "ttft_prediction_error_s": counters.ttft_prediction_error_s / max(1, counters.ttft_predictions),
            "parked": counters.parked,
            "parked_wait_vs_predicted": counters.parked_wait_s / counters.parked_wait_predicted_s
            if counters.parked_wait_predicted_s
            else None,
            "patience_ran_out": counters.patience_ran_out,
        }


STRATEGIES = {
    "round_robin": RoundRobinImmediate,
    "least_conn": LeastConnectionsImmediate,
    "slot_queue": lambda: Balanced(
        "round_robin", "slot_queue", "slot-aware queue, round robin, no affinity (HAProxy maxconn = slots)"
    ),
    "least_busy": lambda: Balanced("least_busy", "least_busy", "llamacpp-ha, least_busy policy"),
    "affinity": lambda: Balanced("affinity", "affinity", "llamacpp-ha, affinity-first with load guard (default)"),
    "in_order": lambda: Balanced(
        "affinity",
        "in_order",
        "llamacpp-ha, default policy in arrival order (patience_max_s 0, prefill_backlog_s null)",
        patience_max_s=0.0,
        prefill_backlog_s=None,
    ),
}


def make_strategy(name: str) -> Strategy:
    factory: Any = STRATEGIES[name]
    strategy: Strategy = factory()
    return strategy
