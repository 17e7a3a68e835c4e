"""The classic-httpx face (openai 1.x/2.x): respx mocks the backends, the SDK runs over real sockets.

This module runs in the main environment (openai 3.x, which also takes classic httpx clients) and
in the openai 2.x environment that .ci/run creates; it uses only what both SDK versions have.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
import respx
from openai import AsyncOpenAI, OpenAI

from llamacpp_ha import BackendConfig, BalancerConfig
from llamacpp_ha import httpx as classic
from llamacpp_ha.sim import SimConfig, SimServer
from llamacpp_ha.sim._protocol import models_body, props_body

from .helpers import eventually, sim_busy_slots

Sims = Callable[..., SimServer]
CHAT = {"model": "tiny-random-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
OK = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}]}


def mock_backend(router: respx.MockRouter, host: str, slots: int = 2) -> None:
    """A llama-server's poll endpoints, in the captured shapes."""
    config = SimConfig(slots=slots)
    base = f"http://{host}:8080"
    router.get(f"{base}/health").respond(200, json={"status": "ok"})
    router.get(f"{base}/props").respond(200, json=props_body(config))
    router.get(f"{base}/v1/models").respond(200, json=models_body(config, 0))
    slots_body = [{"id": i, "n_ctx": 1024, "speculative": False, "is_processing": False} for i in range(slots)]
    router.get(f"{base}/slots").respond(200, json=slots_body)


def fleet(*hosts: str, **settings: object) -> BalancerConfig:
    backends = [BackendConfig(url=f"http://{host}:8080", name=host) for host in hosts]
    return BalancerConfig(backends=backends, **settings)  # type: ignore[arg-type]


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=False) as mock:
        yield mock


@pytest.mark.anyio
async def test_requests_reach_the_chosen_backend_through_classic_httpx(router: respx.MockRouter) -> None:
    mock_backend(router, "gpu1")
    chat = router.post("http://gpu1:8080/v1/chat/completions").respond(200, json=OK)
    async with classic.ha_client(fleet("gpu1")) as client:
        assert isinstance(client, httpx.AsyncClient)
        response = await client.post("/v1/chat/completions?x=1", json=CHAT, headers={"x-conversation-id": "c"})
        assert response.status_code == 200
        assert response.json() == OK
        assert response.headers["x-llamacpp-ha-backend"] == "gpu1"
        assert response.extensions["llamacpp_ha"].backend == "gpu1"
        assert client.balancer.snapshot().in_flight == 0
    sent = chat.calls.last.request
    assert str(sent.url) == "http://gpu1:8080/v1/chat/completions?x=1"
    assert "x-conversation-id" not in sent.headers
    assert json.loads(sent.content) == CHAT


@pytest.mark.anyio
async def test_a_refused_backend_fails_over(router: respx.MockRouter) -> None:
    mock_backend(router, "gpu1")
    mock_backend(router, "gpu2")
    router.post("http://gpu1:8080/v1/chat/completions").mock(side_effect=httpx.ConnectError("refused"))
    router.post("http://gpu2:8080/v1/chat/completions").respond(200, json=OK)
    async with classic.ha_client(fleet("gpu1", "gpu2", policy="round_robin")) as client:
        hosts = {
            (await client.post("/v1/chat/completions", json=CHAT)).headers["x-llamacpp-ha-backend"] for _ in range(3)
        }
        assert hosts == {"gpu2"}
        assert client.balancer.snapshot().counters.retries >= 1


@pytest.mark.anyio
async def test_engine_errors_reach_the_caller_as_classic_httpx_errors(router: respx.MockRouter) -> None:
    mock_backend(router, "gpu1")

    async def cut_body() -> AsyncIterator[bytes]:
        yield b'{"choices": '
        raise httpx.ReadError("connection reset")

    router.post("http://gpu1:8080/v1/chat/completions").respond(200, content=cut_body())
    async with classic.ha_client(fleet("gpu1")) as client:
        with pytest.raises(httpx.ReadError):
            await client.post("/v1/chat/completions", json=CHAT)
        assert client.balancer.snapshot().in_flight == 0


@pytest.mark.anyio
async def test_balancer_errors_keep_the_openai_shape(router: respx.MockRouter) -> None:
    mock_backend(router, "gpu1")
    async with classic.ha_client(fleet("gpu1")) as client:
        response = await client.post("/v1/chat/completions", content=b"{nope")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request"
    assert response.headers["x-should-retry"] == "false"


def test_the_sync_classic_client_uses_the_same_engine(router: respx.MockRouter) -> None:
    mock_backend(router, "gpu1")
    router.post("http://gpu1:8080/v1/chat/completions").respond(200, json=OK)
    with classic.ha_sync_client(fleet("gpu1")) as client:
        assert isinstance(client, httpx.Client)
        response = client.post("/v1/chat/completions", json=CHAT)
        assert response.json() == OK
        assert client.balancer.snapshot().in_flight == 0


@pytest.mark.anyio
async def test_openai_sdk_streams_through_the_classic_face(sims: Sims) -> None:
    sim = sims(slots=1, decode_tokens_per_s=100)
    config = BalancerConfig(backends=[BackendConfig(url=sim.url)])
    http = classic.ha_client(config)
    client = AsyncOpenAI(base_url="http://llamacpp-ha/v1", api_key="unused", http_client=http)
    completion = await client.chat.completions.create(
        model="tiny-random-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert completion.choices[0].message.content
    stream = await client.chat.completions.create(
        model="tiny-random-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=200, stream=True
    )
    async for _ in stream:
        break
    assert http.balancer.snapshot().in_flight == 1
    await stream.close()
    assert http.balancer.snapshot().in_flight == 0
    await eventually(lambda: _idle(sim.url))
    await http.aclose()


async def _idle(url: str) -> bool:
    return await sim_busy_slots(url) == 0


def test_openai_sdk_sync_classic_face(sims: Sims) -> None:
    sim = sims(slots=1)
    http = classic.ha_sync_client(BalancerConfig(backends=[BackendConfig(url=sim.url)]))
    client = OpenAI(base_url="http://llamacpp-ha/v1", api_key="unused", http_client=http)
    stream = client.chat.completions.create(
        model="tiny-random-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
    )
    chunks = [chunk for chunk in stream]
    assert chunks
    assert http.balancer.snapshot().in_flight == 0
    http.close()
