"""A backend that dies under load: waiting requests go elsewhere; it is dropped and re-admitted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import openai
import pytest
from openai import AsyncOpenAI

from llamacpp_ha import HAAsyncClient
from llamacpp_ha.sim import SimProcess, SimServer

from .helpers import chat, eventually, fleet_config

pytestmark = pytest.mark.anyio

Sims = Callable[..., SimServer]
Clients = Callable[..., tuple[HAAsyncClient, AsyncOpenAI]]
MODEL = "tiny-random-llama"
POLL_S = 0.25


async def test_backend_killed_under_load(sims: Sims, clients: Clients) -> None:
    survivor = sims(slots=1, decode_tokens_per_s=200)
    with SimProcess(slots=1, decode_tokens_per_s=100) as doomed:
        http, client = clients(fleet_config(doomed.url, survivor, poll_interval_s=POLL_S, policy="round_robin"))
        await http.balancer.start()
        backend_of: dict[int, str] = {}
        first_chunk = asyncio.Event()

        async def run(i: int) -> str:
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=chat(f"job {i}"), max_tokens=40, stream=True
            )
            backend_of[i] = raw.headers["x-llamacpp-ha-backend"]
            first_chunk.set()
            return "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])

        tasks = [asyncio.create_task(run(i)) for i in range(6)]
        await first_chunk.wait()
        await eventually(lambda: http.balancer.snapshot().queue_depth >= 3)
        doomed.kill()
        killed_at = time.monotonic()
        await eventually(lambda: http.balancer.backend("b0").state == "dead", timeout=2 * POLL_S + 0.5)
        detected_after = time.monotonic() - killed_at
        results = await asyncio.gather(*tasks, return_exceptions=True)

        failed = [i for i, result in enumerate(results) if isinstance(result, BaseException)]
        assert all(isinstance(results[i], openai.APIError) for i in failed)
        assert len(failed) <= 1  # only the stream that was running on the killed backend
        assert all(backend_of[i] == "b0" for i in failed)
        assert len([r for r in results if isinstance(r, str) and r]) >= 5
        assert detected_after <= 2 * POLL_S + 0.5
        assert http.balancer.snapshot().in_flight == 0

        doomed.start()
        await eventually(lambda: http.balancer.backend("b0").state == "healthy", timeout=2 * POLL_S + 2)
        served = set()
        for i in range(4):
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=chat(f"after {i}"), max_tokens=2
            )
            served.add(raw.headers["x-llamacpp-ha-backend"])
        assert "b0" in served


async def test_a_dead_backend_at_dispatch_fails_over_transparently(sims: Sims, clients: Clients) -> None:
    survivor = sims(slots=2)
    with SimProcess(slots=2) as doomed:
        http, client = clients(fleet_config(doomed.url, survivor, poll_interval_s=30, policy="round_robin"))
        await http.balancer.start()
        doomed.kill()  # the balancer has not polled since: it still believes b0 is healthy
        for i in range(4):
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=chat(f"q{i}"), max_tokens=2
            )
            assert raw.headers["x-llamacpp-ha-backend"] == "b1"
        assert http.balancer.backend("b0").state == "dead"
        assert http.balancer.snapshot().counters.retries == 1
