"""The in-process client under Trio: queueing, patience and shutdown run on anyio, not on asyncio.

The lifecycle paths (tests/test_lifecycle.py) and the scheduler's own tests (tests/test_routing.py)
run under both event loops; these are what only a whole fleet under Trio shows.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest
from openai import AsyncOpenAI

from llamacpp_ha import BackendConfig, BalancerConfig, HAAsyncClient, SharedConfig, ha_client
from llamacpp_ha.sim import SimServer

from .helpers import chat, eventually, fleet_config, sim_busy_slots

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.filterwarnings(r"ignore:Async generator '(openai|httpx2|httpcore2)\.:ResourceWarning"),
]

Sims = Callable[..., SimServer]
Clients = Callable[..., tuple[HAAsyncClient, AsyncOpenAI]]
MODEL = "tiny-random-llama"


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


async def test_a_burst_waits_in_our_queue_and_every_request_is_answered(sims: Sims, clients: Clients) -> None:
    first, second = sims(slots=1, decode_tokens_per_s=400), sims(slots=1, decode_tokens_per_s=400)
    http, client = clients(fleet_config(first, second))
    answers: list[str] = []
    most_waiting = 0

    async def ask(i: int) -> None:
        completion = await client.chat.completions.create(model=MODEL, messages=chat(f"q{i}"), max_tokens=8)
        answers.append(completion.choices[0].message.content or "")

    async with anyio.create_task_group() as group:
        for i in range(12):
            group.start_soon(ask, i)
        with anyio.fail_after(30):
            while len(answers) < 12:
                most_waiting = max(most_waiting, http.balancer.snapshot().queue_depth)
                await anyio.sleep(0.01)
    assert len(answers) == 12
    assert all(answers)
    assert most_waiting >= 6, "two slots for twelve requests: the rest wait with us, not inside the backends"
    assert first.app.pool.peak_deferred == 0
    assert second.app.pool.peak_deferred == 0
    snapshot = http.balancer.snapshot()
    assert (snapshot.in_flight, snapshot.queue_depth) == (0, 0)
    for sim in (first, second):
        await eventually(lambda sim=sim: _idle(sim.url))  # type: ignore[misc]


async def _idle(url: str) -> bool:
    return await sim_busy_slots(url) == 0


async def test_closing_the_client_stops_the_engine_and_fails_waiters(sims: Sims) -> None:
    sim = sims(slots=1, decode_tokens_per_s=50)
    http = ha_client(fleet_config(sim))
    client = AsyncOpenAI(base_url="http://llamacpp-ha/v1", api_key="unused", http_client=http)
    blocker = await client.chat.completions.create(model=MODEL, messages=chat("x"), max_tokens=300, stream=True)
    await blocker.__anext__()
    outcome: list[str] = []

    async def waiting() -> None:
        try:
            await client.with_options(max_retries=0).chat.completions.create(
                model=MODEL, messages=chat("y"), max_tokens=2
            )
        except Exception as exc:  # the SDK's error for our 503
            outcome.append(type(exc).__name__)

    async with anyio.create_task_group() as group:
        group.start_soon(waiting)
        await eventually(lambda: http.balancer.snapshot().queue_depth == 1)
        with anyio.fail_after(5):
            await http.aclose()
    assert outcome == ["InternalServerError"]
    assert http.balancer.closed
    await blocker.close()
    assert http.balancer.snapshot().in_flight == 0
    await eventually(lambda: _idle(sim.url))


async def test_shared_mode_says_it_needs_asyncio() -> None:
    config = BalancerConfig(
        backends=[BackendConfig(url="http://127.0.0.1:9")],
        shared=SharedConfig(url="redis://127.0.0.1:9/0"),
    )
    async with ha_client(config) as http:
        with pytest.raises(RuntimeError, match="asyncio only, not under trio"):
            await http.balancer.start()
