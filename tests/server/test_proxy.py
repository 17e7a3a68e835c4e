"""The proxy end to end: the real OpenAI SDK -> uvicorn -> llamacpp-ha-server -> simulated llama-servers."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable

import httpx2
import pytest
from openai import AsyncOpenAI

from llamacpp_ha.sim import SimServer

from ..helpers import chat, eventually, sim_busy_slots
from .conftest import AppServer

pytestmark = pytest.mark.anyio

Sims = Callable[..., SimServer]
Serve = Callable[..., AppServer]
MODEL = "tiny-random-llama"


def openai_client(server: AppServer, key: str = "unused") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


async def test_streaming_and_non_streaming_chat(sims: Sims, serve: Serve) -> None:
    server = serve(sims(slots=2), sims(slots=2))
    async with openai_client(server) as client:
        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=chat("hi"), max_tokens=5)
        assert raw.headers["x-llamacpp-ha-backend"] in ("b0", "b1")
        assert raw.parse().choices[0].message.content
        stream = await client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=5, stream=True)
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    async with httpx2.AsyncClient() as http:
        models = await http.get(f"{server.url}/v1/models")
    assert [m["id"] for m in models.json()["data"]] == ["tiny-random-llama.gguf"]


async def test_chunks_are_streamed_as_they_come(sims: Sims, serve: Serve) -> None:
    server = serve(sims(slots=1, decode_tokens_per_s=20))
    body = {"model": MODEL, "messages": chat("hi"), "max_tokens": 10, "stream": True}
    arrivals: list[float] = []
    loop = asyncio.get_running_loop()
    async with httpx2.AsyncClient() as http, http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
        async for _ in r.aiter_raw():
            arrivals.append(loop.time())
    assert len(arrivals) >= 5  # not re-buffered into one body
    assert arrivals[-1] - arrivals[0] > 0.2


async def test_requests_beyond_the_slots_wait_in_our_queue(sims: Sims, serve: Serve) -> None:
    a, b = sims(slots=1, decode_tokens_per_s=200), sims(slots=1, decode_tokens_per_s=200)
    server = serve(a, b)
    depths: list[int] = []

    async def watch_queue(http: httpx2.AsyncClient) -> None:
        while True:
            depths.append((await http.get(f"{server.url}/monitor/data")).json()["snapshot"]["queue_depth"])
            await asyncio.sleep(0.02)

    async with openai_client(server) as client, httpx2.AsyncClient() as http:
        watcher = asyncio.create_task(watch_queue(http))

        async def one(i: int) -> str:
            stream = await client.chat.completions.create(
                model=MODEL, messages=chat(f"q{i}"), max_tokens=20, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        texts = await asyncio.gather(*(one(i) for i in range(6)))
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
    assert all(texts)
    assert max(depths) >= 2
    assert (a.app.pool.peak_deferred, b.app.pool.peak_deferred) == (0, 0)
    assert server.context.balancer.snapshot().in_flight == 0


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"model": "x", "messages": [', 400, "invalid_request"),
        (b'{"model": "tiny-random-llama", "messages": "hi"}', 400, "invalid_request"),
        (b'{"model": 7, "messages": [{"role": "user", "content": "hi"}]}', 400, "invalid_request"),
        (b'["not", "an", "object"]', 400, "invalid_request"),
        (b'{"model": "gpt-7", "messages": [{"role": "user", "content": "hi"}]}', 404, "model_not_found"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * 3000}]}).encode(), 413, "request_too_large"),
    ],
    ids=["malformed-json", "messages-not-array", "model-not-string", "not-an-object", "unknown-model", "too-large"],
)
async def test_bad_input_gets_an_openai_error_and_touches_no_backend(
    sims: Sims, serve: Serve, body: bytes, status: int, code: str
) -> None:
    sim = sims(slots=1)
    server = serve(sim, server={"max_body_bytes": 2048})
    async with httpx2.AsyncClient() as http:
        response = await http.post(f"{server.url}/v1/chat/completions", content=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert {"message", "type", "code"} <= set(error) <= {"message", "type", "code", "param"}
    assert error["code"] == code
    assert sim.app.inference_requests == 0


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/v1/nope", 404, "not_found"), ("GET", "/v1/chat/completions", 405, "method_not_allowed")],
)
async def test_unknown_route_and_wrong_method(
    sims: Sims, serve: Serve, method: str, path: str, status: int, code: str
) -> None:
    server = serve(sims(slots=1))
    async with httpx2.AsyncClient() as http:
        response = await http.request(method, f"{server.url}{path}")
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def raw_request(url: str, body: dict[str, object]) -> socket.socket:
    """Send a request over a plain socket that the test can drop at any moment."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


async def test_a_client_that_drops_mid_stream_frees_the_backend_slot(sims: Sims, serve: Serve) -> None:
    sim = sims(slots=1, decode_tokens_per_s=50)
    server = serve(sim)
    sock = raw_request(server.url, {"model": MODEL, "messages": chat("x"), "max_tokens": 500, "stream": True})
    head = await asyncio.to_thread(sock.recv, 4096)
    assert head.startswith(b"HTTP/1.1 200")
    assert await sim_busy_slots(sim.url) == 1
    sock.close()
    await eventually(lambda: server.context.balancer.snapshot().in_flight == 0)
    await eventually(lambda: _idle(sim.url))
    assert server.context.state.in_flight == 0


async def _idle(url: str) -> bool:
    return await sim_busy_slots(url) == 0


async def test_a_client_that_drops_while_queued_leaves_the_queue(sims: Sims, serve: Serve) -> None:
    sim = sims(slots=1, decode_tokens_per_s=100)
    server = serve(sim)
    balancer = server.context.balancer
    async with openai_client(server) as client:
        blocker = await client.chat.completions.create(model=MODEL, messages=chat("a"), max_tokens=300, stream=True)
        sock = raw_request(server.url, {"model": MODEL, "messages": chat("queued"), "max_tokens": 5})
        await eventually(lambda: balancer.snapshot().queue_depth == 1)
        sock.close()
        await eventually(lambda: balancer.snapshot().queue_depth == 0)
        await blocker.close()
    await eventually(lambda: balancer.snapshot().in_flight == 0)
    await eventually(lambda: _idle(sim.url))
    assert sim.app.inference_requests == 1  # the queued request never reached the backend
    assert server.context.state.in_flight == 0


async def test_a_router_mode_backend_beside_a_single_model_one(sims: Sims, serve: Serve) -> None:
    from llamacpp_ha.sim import SimConfig, SimulatedLlamaRouter

    router = SimServer(SimulatedLlamaRouter({"qwen": SimConfig(slots=2), "gemma": SimConfig(slots=2)}, load_s=0.1))
    with router:
        server = serve(sims(slots=2), router)
        async with httpx2.AsyncClient() as http:
            await eventually(lambda: _models(http, server), timeout=5)
            monitor = (await http.get(f"{server.url}/monitor/data")).json()
            metrics = (await http.get(f"{server.url}/metrics")).text
        names = [b["name"] for b in monitor["snapshot"]["backends"]]
        assert names == ["b0", "b1", "b1/qwen", "b1/gemma"]
        assert 'llamacpp_ha_backend_state{backend="b1/qwen",state="unloaded"} 1.0' in metrics
        async with openai_client(server) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="qwen", messages=chat("hi"), max_tokens=3
            )
            assert raw.headers["x-llamacpp-ha-backend"] == "b1/qwen"
            stream = await client.chat.completions.create(model="gemma", messages=chat("hi"), max_tokens=3, stream=True)
            assert [c async for c in stream][-1].choices[0].finish_reason == "length"
            single = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=chat("x"), max_tokens=2
            )
            assert single.headers["x-llamacpp-ha-backend"] == "b0"
    assert router.app.models["qwen"].loads == 1
    assert router.app.models["gemma"].loads == 1


async def _models(http: httpx2.AsyncClient, server: AppServer) -> bool:
    models = (await http.get(f"{server.url}/v1/models")).json()["data"]
    return sorted(m["id"] for m in models) == ["gemma", "qwen", "tiny-random-llama.gguf"]
