"""Polling: state from each backend's own endpoints, independent per backend."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator

import pytest
from openai import AsyncOpenAI

from llamacpp_ha import HAAsyncClient
from llamacpp_ha.sim import SimServer

from .helpers import eventually, fleet_config

pytestmark = pytest.mark.anyio

Sims = Callable[..., SimServer]
Clients = Callable[..., tuple[HAAsyncClient, AsyncOpenAI]]


@pytest.fixture
def hung_backend() -> Iterator[str]:
    """A port that accepts TCP connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_a_hung_backend_does_not_slow_the_others(sims: Sims, clients: Clients, hung_backend: str) -> None:
    sim = sims(slots=2)
    http, _ = clients(fleet_config(hung_backend, sim, poll_interval_s=0.1, poll_timeout_s=1.0))
    await http.balancer.start()
    healthy = http.balancer.backend("b1")
    seen: set[float] = set()
    for _ in range(8):
        assert healthy.last_poll is not None
        seen.add(healthy.last_poll)
        await asyncio.sleep(0.1)
    assert len(seen) >= 4  # polled about every 0.1 s although b0's polls each hang for 1 s
    await eventually(lambda: http.balancer.backend("b0").state == "dead")


async def test_loading_then_ready(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=2, loading_s=0.5)
    http, _ = clients(fleet_config(sim, poll_interval_s=0.1))
    await http.balancer.start()
    assert http.balancer.backend("b0").state == "loading"
    await eventually(lambda: http.balancer.backend("b0").state == "healthy")
    assert http.balancer.backend("b0").capacity == 2


async def test_no_slots_endpoint_falls_back_to_props(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=3, slots_endpoint=False)
    http, client = clients(fleet_config(sim))
    await http.balancer.start()
    backend = http.balancer.snapshot().backends[0]
    assert (backend.state, backend.capacity, backend.busy) == ("healthy", 3, None)
    completion = await client.chat.completions.create(
        model="tiny-random-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert completion.choices


async def test_api_key_is_sent_on_polls_and_requests(sims: Sims, clients: Clients) -> None:
    from llamacpp_ha import BackendConfig, BalancerConfig

    sim = sims(slots=2, api_key="test-key-123", aliases=("tiny-alias", "tiny-chat"))
    config = BalancerConfig(backends=[BackendConfig(url=sim.url, api_key="test-key-123")])  # type: ignore[arg-type]
    http, client = clients(config)
    completion = await client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert completion.model == "tiny-alias"
    assert http.balancer.snapshot().backends[0].models == ["tiny-alias"]


async def test_other_clients_load_counts_against_free_slots(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=2, decode_tokens_per_s=50)
    http, _ = clients(fleet_config(sim, poll_interval_s=0.1))
    other_http, other = clients(fleet_config(sim, poll_interval_s=0.1))  # another team, same backend
    stream = await other.chat.completions.create(
        model="tiny-random-llama", messages=[{"role": "user", "content": "x"}], max_tokens=200, stream=True
    )
    await http.balancer.start()
    await eventually(lambda: http.balancer.snapshot().backends[0].external == 1)
    snapshot = http.balancer.snapshot().backends[0]
    assert (snapshot.in_flight, snapshot.busy, snapshot.free) == (0, 1, 1)
    await stream.close()
    await eventually(lambda: http.balancer.snapshot().backends[0].free == 2)
    assert other_http.balancer.snapshot().in_flight == 0


async def test_a_failing_backend_is_polled_again_at_once_but_the_others_keep_their_schedule() -> None:
    import time

    import httpx2

    from llamacpp_ha import HATransport

    from .mock_fleet import MockFleet

    fleet = MockFleet.of("flaky", "steady")
    transport = HATransport(fleet.config(poll_interval_s=0.5, policy="round_robin"), upstream=fleet.transport())
    async with httpx2.AsyncClient(transport=transport, base_url="http://x") as client:
        await transport.balancer.start()

        def refuse(request: httpx2.Request) -> httpx2.Response:
            raise httpx2.ConnectError("[Errno 111] Connection refused", request=request)

        # Its polls succeed, its requests fail: every failure asks for a poll of it at once.
        fleet.backends["flaky"].inference = refuse
        fleet.polls.clear()
        started = time.monotonic()
        body = {"messages": [{"role": "user", "content": "hi"}]}
        while time.monotonic() - started < 1.0:
            assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
            await asyncio.sleep(0.01)
    flaky_polls = [p for p in fleet.polls if p == "flaky /slots"]
    steady_slots_polls = [p for p in fleet.polls if p == "steady /slots"]
    assert len(flaky_polls) > 5
    # 1 s at a 0.5 s interval: 2 or 3 polls of the steady backend, whatever the flaky one does.
    assert len(steady_slots_polls) <= 3
