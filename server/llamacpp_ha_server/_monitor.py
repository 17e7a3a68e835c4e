from __future__ import annotations

import asyncio
import time
from collections import deque
from importlib import resources
from typing import Any

from llamacpp_ha import Balancer

__all__ = ["MonitorHistory", "monitor_page"]

_WINDOW_S = 10.0
"""TTFT percentiles, output tokens/s and the cache share are over the requests that finished in
the last this many seconds: one second holds too few requests for a p99."""
_LATEST = 50
"""Requests the monitor's table shows."""


def monitor_page() -> bytes:
    """The monitor's HTML: one self-contained page, no external assets (it must work offline)."""
    return resources.files(__package__).joinpath("monitor.html").read_bytes()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class MonitorHistory:
    """What the monitor's charts show, sampled once a second, and the latest requests."""

    def __init__(self, balancer: Balancer, seconds: int) -> None:
        self._balancer = balancer
        self._samples: deque[dict[str, Any]] = deque(maxlen=seconds)
        self._finished: deque[tuple[float, dict[str, Any]]] = deque()
        """Requests finished within the window, with when they finished."""
        self._latest: deque[dict[str, Any]] = deque(maxlen=_LATEST)
        self._last_sample = self._started = time.monotonic()

    def record(self, request: dict[str, Any]) -> None:
        """A proxied request finished (its access-log record)."""
        self._finished.append((time.monotonic(), request))
        self._latest.appendleft({"t": round(time.time(), 3), **request})

    def sample(self) -> None:
        snapshot = self._balancer.snapshot()
        now = time.monotonic()
        elapsed = max(1e-3, now - self._last_sample)
        self._last_sample = now
        while self._finished and now - self._finished[0][0] > _WINDOW_S:
            self._finished.popleft()
        window = [request for _, request in self._finished]
        span = max(1.0, min(_WINDOW_S, now - self._started))
        last = [request for at, request in self._finished if now - at <= elapsed]
        ttfts = [r["ttft_ms"] for r in window if r.get("ttft_ms") is not None]
        prompt = sum(r.get("prompt_tokens") or 0 for r in window)
        statuses = {"2xx": 0, "4xx": 0, "5xx": 0}
        for request in last:
            status = request["status"]
            statuses["2xx" if status < 400 else "4xx" if status < 500 else "5xx"] += 1
        self._samples.append(
            {
                "t": round(time.time(), 3),
                "queue": snapshot.queue_depth,
                "in_flight": snapshot.in_flight,
                "busy": sum(b.busy if b.busy is not None else b.in_flight for b in snapshot.backends),
                "capacity": sum(b.capacity for b in snapshot.backends if b.state == "healthy"),
                "backends": {b.name: b.busy if b.busy is not None else b.in_flight for b in snapshot.backends},
                "ttft_p50_ms": _percentile(ttfts, 50),
                "ttft_p99_ms": _percentile(ttfts, 99),
                "output_tokens_per_s": round(sum(r.get("output_tokens") or 0 for r in window) / span, 1),
                "requests_per_s": {k: round(v / elapsed, 2) for k, v in statuses.items()},
                "cached_share": round(sum(r.get("cached_tokens") or 0 for r in window) / prompt, 3) if prompt else None,
            }
        )

    def samples(self) -> list[dict[str, Any]]:
        return list(self._samples)

    def latest(self) -> list[dict[str, Any]]:
        """The latest requests, newest first."""
        return list(self._latest)

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(1.0)
