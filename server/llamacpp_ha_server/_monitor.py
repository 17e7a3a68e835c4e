from __future__ import annotations

import asyncio
import time
from collections import deque
from importlib import resources
from typing import Any

from llamacpp_ha import Balancer

__all__ = ["MonitorHistory", "monitor_page"]


def monitor_page() -> bytes:
    """The monitor's HTML: one self-contained page, no external assets (it must work offline)."""
    return resources.files(__package__).joinpath("monitor.html").read_bytes()


class MonitorHistory:
    """Queue depth and slot use, sampled once a second, for the monitor's charts."""

    def __init__(self, balancer: Balancer, seconds: int) -> None:
        self._balancer = balancer
        self._samples: deque[dict[str, Any]] = deque(maxlen=seconds)

    def sample(self) -> None:
        snapshot = self._balancer.snapshot()
        self._samples.append(
            {
                "t": round(time.time(), 3),
                "queue": snapshot.queue_depth,
                "in_flight": snapshot.in_flight,
                "busy": sum(b.busy if b.busy is not None else b.in_flight for b in snapshot.backends),
                "capacity": sum(b.capacity for b in snapshot.backends if b.state == "healthy"),
            }
        )

    def samples(self) -> list[dict[str, Any]]:
        return list(self._samples)

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(1.0)
