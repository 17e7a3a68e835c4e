"""Every way a request can end gives its slot back: ours (in_flight) and the backend's (/slots).

Each test runs under asyncio and under Trio: the engine is written against anyio.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import openai
import pytest
from openai import AsyncOpenAI

from llamacpp_ha import HAAsyncClient
from llamacpp_ha.sim import SimProcess, SimServer

from .helpers import chat, eventually, fleet_config, sim_busy_slots

pytestmark = [
    pytest.mark.anyio,
    # Under Trio, the openai SDK and httpx2 leave async generators to the garbage collector (with a
    # plain httpx2 client too); ours must not, so only theirs are let through.
    pytest.mark.filterwarnings(r"ignore:Async generator '(openai|httpx2|httpcore2)\.:ResourceWarning"),
]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


Sims = Callable[..., SimServer]
Clients = Callable[..., tuple[HAAsyncClient, AsyncOpenAI]]
MODEL = "tiny-random-llama"


async def assert_all_slots_free(http: HAAsyncClient, *urls: str) -> None:
    await eventually(lambda: http.balancer.snapshot().in_flight == 0)
    for url in urls:
        await eventually(lambda url=url: _idle(url))  # type: ignore[misc]
    assert http.balancer.snapshot().queue_depth == 0


async def _idle(url: str) -> bool:
    return await sim_busy_slots(url) == 0


async def slow_stream(client: AsyncOpenAI, tokens: int = 200) -> openai.AsyncStream[object]:
    stream = await client.chat.completions.create(model=MODEL, messages=chat("go"), max_tokens=tokens, stream=True)
    return stream  # type: ignore[return-value]


async def test_completed_requests(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=2)
    http, client = clients(fleet_config(sim))
    completion = await client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=5)
    assert completion.choices[0].message.content
    stream = await client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=5, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "length"
    await assert_all_slots_free(http, sim.url)


async def test_consumer_closes_mid_stream(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=1, decode_tokens_per_s=100)
    http, client = clients(fleet_config(sim))
    stream = await slow_stream(client)
    iterator = stream.__aiter__()
    await iterator.__anext__()
    await iterator.__anext__()
    assert http.balancer.snapshot().in_flight == 1
    assert await sim_busy_slots(sim.url) == 1
    await stream.close()
    await assert_all_slots_free(http, sim.url)


async def test_consumer_cancelled_while_streaming(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=1, decode_tokens_per_s=50)
    http, client = clients(fleet_config(sim))
    reading = anyio.Event()

    async def consume() -> None:
        stream = await slow_stream(client)
        async for _ in stream:
            reading.set()

    async with anyio.create_task_group() as group:
        group.start_soon(consume)
        await reading.wait()
        group.cancel_scope.cancel()
    await assert_all_slots_free(http, sim.url)


async def test_consumer_cancelled_while_queued(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=1, decode_tokens_per_s=100)
    http, client = clients(fleet_config(sim))
    blocker = await slow_stream(client)
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: client.chat.completions.create(model=MODEL, messages=chat("q"), max_tokens=2))
        await eventually(lambda: http.balancer.snapshot().queue_depth == 1)
        group.cancel_scope.cancel()
    assert http.balancer.snapshot().queue_depth == 0
    await blocker.close()
    await assert_all_slots_free(http, sim.url)
    # The slot is really usable again (nothing holds a stale grant).
    done = await client.chat.completions.create(model=MODEL, messages=chat("after"), max_tokens=2)
    assert done.choices


async def test_queue_timeout(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=1, decode_tokens_per_s=100)
    http, client = clients(fleet_config(sim, queue_timeout_s=0.3))
    blocker = await slow_stream(client)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model=MODEL, messages=chat("late"), max_tokens=2)
    assert caught.value.status_code == 503
    body = caught.value.body
    assert isinstance(body, dict)
    assert (body["type"], body["code"]) == ("unavailable_error", "queue_timeout")
    assert "No slot became free" in body["message"]
    assert int(caught.value.response.headers["retry-after-ms"]) > 0
    assert http.balancer.snapshot().counters.queue_timeouts == 1
    await blocker.close()
    await assert_all_slots_free(http, sim.url)


async def test_upstream_error_mid_stream(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=1)
    sim.app.faults.stream_error_after_tokens = 3
    http, client = clients(fleet_config(sim))
    stream = await slow_stream(client, tokens=20)
    received = 0
    with pytest.raises(openai.APIError, match="simulated failure"):
        async for _ in stream:
            received += 1
    assert received == 4  # the role chunk and 3 tokens, then the error event
    await assert_all_slots_free(http, sim.url)


async def test_backend_death_mid_stream(clients: Clients) -> None:
    with SimProcess(slots=1, decode_tokens_per_s=50) as doomed:
        http, client = clients(fleet_config(doomed.url))
        stream = await slow_stream(client)
        iterator = stream.__aiter__()
        await iterator.__anext__()
        assert http.balancer.snapshot().in_flight == 1
        doomed.kill()
        with pytest.raises(openai.APIError, match="failed during the response"):
            async for _ in iterator:
                pass
        await eventually(lambda: http.balancer.snapshot().in_flight == 0)
        assert http.balancer.snapshot().counters.stream_failures == 1
        await eventually(lambda: http.balancer.snapshot().backends[0].state == "dead")
        doomed.start()  # the same port: the backend comes back with all slots free
        await eventually(lambda: http.balancer.snapshot().backends[0].state == "healthy")
        await assert_all_slots_free(http, doomed.url)


async def test_abandoned_stream_is_closed_after_the_idle_deadline(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=1, decode_tokens_per_s=100)
    http, client = clients(fleet_config(sim, stream_idle_timeout_s=0.3, poll_interval_s=0.1))
    abandoned = await slow_stream(client)  # never read, never closed
    assert http.balancer.snapshot().in_flight == 1
    await assert_all_slots_free(http, sim.url)
    assert http.balancer.snapshot().counters.expired_leases == 1
    await abandoned.close()


async def test_consumer_cancelled_while_waiting_for_a_non_stream_response(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=1, decode_tokens_per_s=50, disconnect_check_s=0.3)
    http, client = clients(fleet_config(sim))
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: client.chat.completions.create(model=MODEL, messages=chat("x"), max_tokens=200))
        await eventually(lambda: http.balancer.snapshot().in_flight == 1)
        group.cancel_scope.cancel()
    # Ours is back at once, but the backend is still generating: the slot is not free yet.
    assert http.balancer.snapshot().in_flight == 0
    assert http.balancer.snapshot().backends[0].free == 0
    await assert_all_slots_free(http, sim.url)
    await eventually(lambda: http.balancer.snapshot().backends[0].free == 1)
    assert sim.app.pool.peak_deferred == 0


async def test_a_backend_that_goes_silent_gets_504_and_its_slot_back(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=1, decode_tokens_per_s=2)  # a non-stream answer of 100 tokens takes 50 s
    http, client = clients(fleet_config(sim, read_timeout_s=0.5))
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=100)
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "upstream_timeout"  # type: ignore[index]
    assert time.monotonic() - started < 5
    assert http.balancer.snapshot().in_flight == 0


async def test_a_slow_steady_reader_keeps_its_stream_and_a_stalled_one_is_told_why(
    sims: Sims, clients: Clients
) -> None:
    sim = sims(slots=2, decode_tokens_per_s=40)
    http, client = clients(fleet_config(sim, stream_idle_timeout_s=1.0, poll_interval_s=0.1))
    steady = await client.chat.completions.create(model=MODEL, messages=chat("a"), max_tokens=10, stream=True)
    pieces = 0
    async for _chunk in steady:  # read slowly, pausing 0.3 s per chunk: below the deadline
        pieces += 1
        await anyio.sleep(0.3)
    assert pieces >= 10
    stalled = await client.chat.completions.create(model=MODEL, messages=chat("b"), max_tokens=200, stream=True)
    await stalled.__anext__()
    await anyio.sleep(2.5)  # away for longer than the deadline: the slot goes back meanwhile
    assert http.balancer.snapshot().counters.expired_leases == 1
    with pytest.raises(openai.APIError, match=r"idle deadline"):
        async for _chunk in stalled:
            pass
    await assert_all_slots_free(http, sim.url)


def test_a_lease_runs_its_idle_clock_only_while_the_consumer_has_the_turn() -> None:
    from llamacpp_ha._backend import Backend
    from llamacpp_ha._config import BackendConfig
    from llamacpp_ha._leases import Lease, LeasePhase

    def phase_of(lease: Lease) -> LeasePhase:  # read afresh: each call below changes it
        return lease.phase

    released: list[Lease] = []
    lease = Lease(Backend(BackendConfig(url="http://127.0.0.1:9")), released.append)
    later = lease.acquired_at + 1_000
    assert phase_of(lease) is LeasePhase.SENDING
    assert lease.idle_for(later) == 0.0, "a long generation before the answer is not idleness"

    async def close() -> None:
        return None

    lease.answered(close)
    assert phase_of(lease) is LeasePhase.DELIVERED
    assert lease.closer is close
    assert lease.idle_for(lease.last_activity + 5) == 5
    lease.reading()
    assert lease.idle_for(later) == 0.0, "a slow backend is not an idle consumer"
    lease.touch()
    lease.delivered()
    assert lease.first_byte_at is not None
    assert lease.idle_for(lease.last_activity + 2) == 2
    lease.release()
    lease.release()
    assert phase_of(lease) is LeasePhase.DONE
    assert released == [lease], "released exactly once"
    lease.reading()
    lease.delivered()
    assert phase_of(lease) is LeasePhase.DONE, "nothing leaves DONE"
    assert lease.idle_for(later) == 0.0
