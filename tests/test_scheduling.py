"""Scheduling over simulated llama-servers on real sockets, with the real OpenAI SDK as client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx2
import pytest
from openai import AsyncOpenAI

from llamacpp_ha import HAAsyncClient, RouteInfo
from llamacpp_ha.sim import SimServer

from .helpers import chat, eventually, fleet_config

pytestmark = pytest.mark.anyio

Sims = Callable[..., SimServer]
Clients = Callable[..., tuple[HAAsyncClient, AsyncOpenAI]]
MODEL = "tiny-random-llama"
# Longer than a few prompt blocks, so the prefix index has something to match.
SYSTEM = "You are a patient guide to South American camelids. " * 40


async def stream_text(client: AsyncOpenAI, content: str, max_tokens: int = 20, **extra: Any) -> str:
    stream = await client.chat.completions.create(
        model=MODEL, messages=chat(content), max_tokens=max_tokens, stream=True, **extra
    )
    parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    return "".join(parts)


async def test_never_more_requests_on_a_backend_than_it_has_slots(sims: Sims, clients: Clients) -> None:
    a, b = sims(slots=1, decode_tokens_per_s=400), sims(slots=1, decode_tokens_per_s=400)
    http, client = clients(fleet_config(a, b, policy="round_robin"))
    arrivals: dict[str, float] = {}
    dispatched: dict[str, float] = {}
    peak_in_flight = {"b0": 0, "b1": 0}

    async def on_request(request: httpx2.Request) -> None:
        arrivals[request.content.decode()] = time.monotonic()

    async def on_response(response: httpx2.Response) -> None:
        info: RouteInfo = response.extensions["llamacpp_ha"]
        dispatched[response.request.content.decode()] = arrivals[response.request.content.decode()] + info.queued_s
        for backend in http.balancer.snapshot().backends:
            peak_in_flight[backend.name] = max(peak_in_flight[backend.name], backend.in_flight)

    http.event_hooks = {"request": [on_request], "response": [on_response]}
    await http.balancer.start()
    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(stream_text(client, f"request {i}")))
        # Let each request reach the queue before the next one is sent, so arrival order is known.
        await eventually(lambda: len(arrivals) == len(tasks))
    texts = await asyncio.gather(*tasks)

    assert all(texts)
    assert peak_in_flight == {"b0": 1, "b1": 1}
    assert a.app.pool.peak_deferred == 0  # llama-server itself never had to queue anything
    assert b.app.pool.peak_deferred == 0
    order = sorted(dispatched, key=dispatched.__getitem__)
    assert order == sorted(arrivals, key=arrivals.__getitem__)
    assert http.balancer.snapshot().counters.requests == 6


async def test_a_conversation_returns_to_the_backend_that_holds_its_prefix(sims: Sims, clients: Clients) -> None:
    a, b = sims(slots=2, n_ctx=4096), sims(slots=2, n_ctx=4096)
    _, client = clients(fleet_config(a, b))
    turns = chat("Tell me about llamas.", system=SYSTEM)
    first = await client.chat.completions.with_raw_response.create(model=MODEL, messages=turns, max_tokens=8)
    home = first.headers["x-llamacpp-ha-backend"]
    reply = first.parse().choices[0].message.content or ""
    for i in range(3):
        turns = [
            *turns,
            {"role": "assistant", "content": reply},
            {"role": "user", "content": f"And then {i}?"},
        ]
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=turns, max_tokens=8)
        completion = raw.parse()
        reply = completion.choices[0].message.content or ""
        assert raw.headers["x-llamacpp-ha-backend"] == home
        # The backend's prompt cache served the earlier turns (timings.cache_n, a llama-server extra).
        assert completion.model_extra is not None
        assert completion.model_extra["timings"]["cache_n"] > 0


async def test_a_full_preferred_backend_yields_to_a_free_one(sims: Sims, clients: Clients) -> None:
    a, b = sims(slots=1, decode_tokens_per_s=100, n_ctx=4096), sims(slots=1, decode_tokens_per_s=100, n_ctx=4096)
    http, client = clients(fleet_config(a, b))
    turns = chat("Tell me about llamas.", system=SYSTEM)
    first = await client.chat.completions.with_raw_response.create(model=MODEL, messages=turns, max_tokens=2)
    home = first.headers["x-llamacpp-ha-backend"]
    home_sim, other = (a, "b1") if home == "b0" else (b, "b0")

    # A long stream with the same prompt occupies the home backend; the next turn, whose prefix
    # lives there, would wait longer for it than it takes to prefill elsewhere.
    blocker = await client.chat.completions.create(model=MODEL, messages=turns, max_tokens=200, stream=True)
    await eventually(lambda: http.balancer.backend(home).in_flight == 1)
    turns = [*turns, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    second = await client.chat.completions.with_raw_response.create(model=MODEL, messages=turns, max_tokens=2)
    assert second.headers["x-llamacpp-ha-backend"] == other
    counters = http.balancer.snapshot().counters
    assert (counters.affinity_hits, counters.affinity_misses) == (1, 1)
    await blocker.close()
    await eventually(lambda: http.balancer.snapshot().in_flight == 0)
    assert home_sim.app.pool.peak_deferred == 0


async def test_requests_for_a_model_nobody_can_serve_now_do_not_block_others(sims: Sims, clients: Clients) -> None:
    tiny = sims(slots=1, decode_tokens_per_s=100)
    big = sims(slots=1, model="big-random-llama.gguf")
    http, client = clients(fleet_config(tiny, big))
    await http.balancer.start()
    blocker = await client.chat.completions.create(model=MODEL, messages=chat("a"), max_tokens=200, stream=True)
    waiting = asyncio.create_task(stream_text(client, "b"))  # waits: the only tiny slot is busy
    await eventually(lambda: http.balancer.snapshot().queue_depth == 1)
    started = time.monotonic()
    other = await client.chat.completions.create(model="big-random-llama", messages=chat("c"), max_tokens=2)
    assert other.model == "big-random-llama.gguf"
    assert time.monotonic() - started < 2  # not stuck behind the waiting tiny request
    assert not waiting.done()
    await blocker.close()
    assert await waiting


@pytest.mark.parametrize("cache_ram_mib", [8192, 0])
async def test_a_request_loads_the_ram_copy_of_a_prompt_a_running_request_holds(
    sims: Sims, clients: Clients, cache_ram_mib: int
) -> None:
    # llama-server saves idle slots to its RAM prompt cache as a task starts; while a request runs
    # in the slot holding the system prompt, the next one loads the saved copy. The balancer
    # expects exactly that, and nothing of it when the backend runs --cache-ram 0.
    sim = sims(slots=3, n_ctx=4096, decode_tokens_per_s=40, cache_ram_mib=cache_ram_mib)
    ram_cache_tokens = 65_536 if cache_ram_mib else 0
    http, client = clients(fleet_config(sim, ram_cache_tokens=ram_cache_tokens, patience_max_s=0.0))
    await http.balancer.start()

    async def ask(question: str, max_tokens: int) -> Any:
        messages = chat(question, system=SYSTEM)
        return await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=max_tokens
        )

    await ask("Tell me about llamas.", 2)
    # A task in another slot (a prompt too unlike the first for llama-server to pick its slot).
    other = chat("Unrelated.", system="Answer in French, briefly and politely. " * 20)
    await client.chat.completions.create(model=MODEL, messages=other, max_tokens=2)
    running = asyncio.create_task(ask("And alpacas?", 40))  # reuses the slot, a second of decoding
    await eventually(lambda: sim.app.pool.processing == 1)
    raw = await ask("And vicunas?", 2)
    info: RouteInfo = raw.http_response.extensions["llamacpp_ha"]
    cache_n = raw.parse().model_extra["timings"]["cache_n"]
    await running
    system_tokens = len(SYSTEM.split())
    if cache_ram_mib:
        assert info.expected_cached_tokens > system_tokens / 2
        assert cache_n > system_tokens
    else:
        assert info.expected_cached_tokens == 0
        assert cache_n < system_tokens / 4
    await eventually(lambda: http.balancer.snapshot().backends[0].in_flight == 0)


async def test_a_backend_holds_one_prompt_per_slot_and_the_balancer_knows_which(sims: Sims, clients: Clients) -> None:
    # Three conversations on a backend of two slots (--cache-ram 0): the third overwrites the
    # least recently used slot, the first conversation's. Its prompts are short next to the
    # context, so only counting slots, not tokens, tells the balancer the first one is gone.
    sim = sims(slots=2, n_ctx=4096, cache_ram_mib=0)
    http, client = clients(fleet_config(sim, ram_cache_tokens=0))
    await http.balancer.start()

    async def ask(conversation: str, question: str) -> tuple[float, int]:
        messages = chat(question, system=f"{conversation} {SYSTEM}")
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=2)
        info: RouteInfo = raw.http_response.extensions["llamacpp_ha"]
        extra = raw.parse().model_extra
        assert extra is not None
        return info.expected_cached_tokens, extra["timings"]["cache_n"]

    for conversation in ("Alpha.", "Bravo.", "Charlie."):
        await ask(conversation, "Tell me about llamas.")
    system_tokens = len(SYSTEM.split())
    expected, cache_n = await ask("Bravo.", "And alpacas?")
    assert expected > system_tokens / 2
    assert cache_n > system_tokens
    expected, cache_n = await ask("Alpha.", "And alpacas?")
    assert expected == 0, "its slot was overwritten: the balancer expects nothing cached"
    assert cache_n < system_tokens / 4
    await eventually(lambda: http.balancer.snapshot().backends[0].in_flight == 0)
