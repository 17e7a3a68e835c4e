"""Errors the balancer answers itself reach the OpenAI SDK in OpenAI's shape, and are not retried."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx2
import openai
import pytest
from openai import AsyncOpenAI

from llamacpp_ha import HAAsyncClient
from llamacpp_ha.sim import SimServer

from .helpers import chat, eventually, fleet_config

pytestmark = pytest.mark.anyio

Sims = Callable[..., SimServer]
Clients = Callable[..., tuple[HAAsyncClient, AsyncOpenAI]]
MODEL = "tiny-random-llama"


def count_requests(http: HAAsyncClient) -> list[httpx2.Request]:
    sent: list[httpx2.Request] = []

    async def record(request: httpx2.Request) -> None:
        sent.append(request)

    http.event_hooks = {"request": [record], "response": []}
    return sent


def error_of(exc: openai.APIStatusError) -> dict[str, object]:
    body = exc.body
    assert isinstance(body, dict)
    assert {"message", "type", "code"} <= set(body) <= {"message", "type", "code", "param"}
    assert exc.response.headers["x-should-retry"] == "false"
    return body


async def test_queue_full_is_429_and_not_retried(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=1, decode_tokens_per_s=100)
    http, client = clients(fleet_config(sim, max_queue=1))
    blocker = await client.chat.completions.create(model=MODEL, messages=chat("a"), max_tokens=200, stream=True)
    queued = asyncio.create_task(client.chat.completions.create(model=MODEL, messages=chat("b"), max_tokens=2))
    await eventually(lambda: http.balancer.snapshot().queue_depth == 1)
    sent = count_requests(http)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model=MODEL, messages=chat("c"), max_tokens=2)
    assert len(sent) == 1  # max_retries=2 by default, yet the SDK tried once
    assert error_of(caught.value)["code"] == "queue_full"
    assert int(caught.value.response.headers["retry-after-ms"]) >= 1000
    await blocker.close()
    assert (await queued).choices


async def test_queue_deadline_is_503_and_not_retried(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=1, decode_tokens_per_s=100)
    http, client = clients(fleet_config(sim, queue_timeout_s=0.2))
    blocker = await client.chat.completions.create(model=MODEL, messages=chat("a"), max_tokens=200, stream=True)
    sent = count_requests(http)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model=MODEL, messages=chat("b"), max_tokens=2)
    assert len(sent) == 1
    assert caught.value.status_code == 503
    assert error_of(caught.value)["code"] == "queue_timeout"
    assert "retry-after-ms" in caught.value.response.headers
    await blocker.close()


async def test_unknown_model_is_404_and_lists_the_models(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=1)
    http, client = clients(fleet_config(sim))
    sent = count_requests(http)
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="gpt-7", messages=chat("a"), max_tokens=2)
    assert len(sent) == 1
    error = error_of(caught.value)
    assert error["code"] == "model_not_found"
    assert "tiny-random-llama.gguf" in str(error["message"])
    assert sim.app.inference_requests == 0


async def test_malformed_body_is_400_without_a_backend_round_trip(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=1)
    http, client = clients(fleet_config(sim))
    sent = count_requests(http)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert len(sent) == 1
    assert error_of(caught.value)["type"] == "invalid_request_error"
    # Not JSON at all: llama-server would say 500; the balancer says 400 itself.
    response = await http.post("/v1/chat/completions", content=b'{"messages": [')
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert sim.app.inference_requests == 0


async def test_models_list_comes_from_the_registry(sims: Sims, clients: Clients) -> None:
    tiny, big = sims(slots=1), sims(slots=1, model="big-random-llama.gguf")
    _, client = clients(fleet_config(tiny, big))
    models = await client.models.list()
    assert [model.id for model in models.data] == ["tiny-random-llama.gguf", "big-random-llama.gguf"]


async def test_max_queue_zero_still_serves_free_slots(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=1, decode_tokens_per_s=100)
    http, client = clients(fleet_config(sim, max_queue=0))
    completion = await client.chat.completions.create(model=MODEL, messages=chat("a"), max_tokens=2)
    assert completion.choices
    blocker = await client.chat.completions.create(model=MODEL, messages=chat("a"), max_tokens=200, stream=True)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model=MODEL, messages=chat("b"), max_tokens=2)
    assert http.balancer.snapshot().queue_depth == 0
    await blocker.close()


async def test_every_backend_down_fails_fast_and_says_why() -> None:
    import time

    from llamacpp_ha import HATransport

    from .mock_fleet import MockFleet

    fleet = MockFleet.of("gpu1", "gpu2")
    for backend in fleet.backends.values():
        backend.reachable = False
    for grace, expected in ((0.0, "no_backend_available"), (60.0, "queue_timeout")):
        config = fleet.config(down_grace_s=grace, queue_timeout_s=0.5)
        transport = HATransport(config, upstream=fleet.transport())
        async with httpx2.AsyncClient(transport=transport, base_url="http://x") as client:
            await transport.balancer.start()
            started = time.monotonic()
            response = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            waited = time.monotonic() - started
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == expected
        if grace == 0:  # dead for longer than the grace period: at once, with each backend's reason
            assert waited < 0.3
            assert "gpu1: dead" in error["message"]
            assert "ConnectError" in error["message"]
        else:  # just died: a restart may be under way, so it waits its turn
            assert waited >= 0.5
    assert fleet.requests == []


async def test_a_prompt_longer_than_every_context_is_refused_without_a_slot(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=1, n_ctx=256)
    http, client = clients(fleet_config(sim))
    # One answer teaches the balancer this model's tokens per character.
    await client.chat.completions.create(model=MODEL, messages=chat("hello there " * 10), max_tokens=2)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=MODEL, messages=chat("hello there " * 400), max_tokens=2)
    assert error_of(caught.value)["code"] == "context_length_exceeded"
    assert sim.app.inference_requests == 1
    assert http.balancer.snapshot().in_flight == 0
    # A prompt near the limit is not refused by the estimate: the backend has the last word.
    near = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=chat("hello there " * 30), max_tokens=2
    )
    assert near.status_code == 200
