"""Helpers shared by the tests."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx2
import pytest
from openai.types.chat import ChatCompletionMessageParam

from llamacpp_ha import BackendConfig, BalancerConfig
from llamacpp_ha.sim import SimServer


def fleet_config(*servers: SimServer[Any] | str, **settings: Any) -> BalancerConfig:
    backends = [BackendConfig(url=s if isinstance(s, str) else s.url, name=f"b{i}") for i, s in enumerate(servers)]
    settings.setdefault("poll_interval_s", 0.2)
    return BalancerConfig(backends=backends, **settings)


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait until ``check`` holds, polling every 20 ms; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await anyio.sleep(0.02)


async def sim_busy_slots(url: str) -> int:
    """Busy slots as the backend itself reports them over HTTP."""
    async with httpx2.AsyncClient() as client:
        slots = (await client.get(f"{url}/slots")).json()
    return sum(slot["is_processing"] for slot in slots)


def chat(content: str, system: str = "You are terse.") -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]
