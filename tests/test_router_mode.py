"""Router-mode backends (``llama-server --models-dir``): each model a router lists is a backend."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import openai
import pytest
from openai import AsyncOpenAI

from llamacpp_ha import BackendState, HAAsyncClient
from llamacpp_ha.sim import SimConfig, SimServer, SimulatedLlamaRouter

from .helpers import chat, eventually, fleet_config

pytestmark = pytest.mark.anyio

Clients = Callable[..., tuple[HAAsyncClient, AsyncOpenAI]]
Routers = Callable[..., SimServer[SimulatedLlamaRouter]]


@pytest.fixture
def routers() -> Iterator[Routers]:
    """Simulated router-mode llama-servers on 127.0.0.1, stopped after the test."""
    started: list[SimServer[SimulatedLlamaRouter]] = []

    def start(models: dict[str, int] | None = None, **options: Any) -> SimServer[SimulatedLlamaRouter]:
        configs = {name: SimConfig(slots=slots) for name, slots in (models or {"a": 2, "b": 3}).items()}
        server = SimServer(SimulatedLlamaRouter(configs, **options)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


async def router_status(url: str) -> dict[str, str]:
    async with httpx2.AsyncClient() as client:
        models = (await client.get(f"{url}/v1/models")).json()["data"]
    return {model["id"]: model["status"]["value"] for model in models}


async def test_each_model_of_a_router_is_a_backend_and_polls_load_nothing(routers: Routers, clients: Clients) -> None:
    router = routers({"a": 2, "b": 3})
    http, _ = clients(fleet_config(router))
    balancer = http.balancer
    await balancer.start()
    for _ in range(3):
        await balancer.poll_now()
    snapshot = balancer.snapshot()
    by_name = {b.name: b for b in snapshot.backends}
    assert set(by_name) == {"b0", "b0/a", "b0/b"}
    assert by_name["b0"].is_router
    assert by_name["b0"].capacity == 0
    assert not by_name["b0"].routable
    for name in ("b0/a", "b0/b"):
        assert by_name[name].router == "b0"
        assert by_name[name].state == BackendState.UNLOADED
        assert by_name[name].routable, "an unloaded model is routable: the router loads it"
    assert [m["id"] for m in balancer.models_payload()["data"]] == ["a", "b"]
    # Polling asked with autoload=false: nothing was loaded by the balancer's own polls.
    assert await router_status(router.url) == {"a": "unloaded", "b": "unloaded"}
    assert all(model.loads == 0 for model in router.app.models.values())


async def test_a_request_loads_its_model_once_and_the_rest_wait_for_its_slots(
    routers: Routers, clients: Clients
) -> None:
    router = routers({"a": 2, "b": 3}, load_s=0.3)
    http, client = clients(fleet_config(router))
    await http.balancer.start()
    replies = await asyncio.gather(
        *(client.chat.completions.create(model="a", messages=chat(f"hi {i}"), max_tokens=3) for i in range(6))
    )
    assert all(reply.choices[0].message.content for reply in replies)
    assert router.app.models["a"].loads == 1, "one request loads the model; the others wait for it"
    assert router.app.models["b"].loads == 0
    server = router.app.server("a")
    assert server is not None
    assert server.pool.peak_deferred == 0, "never more requests than the model's 2 slots"
    child = http.balancer.backend("b0/a")
    await eventually(lambda: child.state is BackendState.HEALTHY and child.capacity == 2)
    # The loading time is learned as such, not as the backend's service time.
    assert child.load_s is not None
    assert 0.25 < child.load_s < 2.0
    assert child.service_s is not None
    assert child.service_s < 0.25
    assert http.balancer.snapshot().in_flight == 0
    assert http.balancer.snapshot().queue_depth == 0


async def test_a_loaded_model_is_preferred_to_loading_it_on_another_router(routers: Routers, clients: Clients) -> None:
    first, second = routers({"a": 2}, load_s=0.2), routers({"a": 2}, load_s=0.2)
    async with httpx2.AsyncClient() as raw:
        await raw.post(f"{second.url}/models/load", json={"model": "a"})
    await eventually(lambda: second.app.models["a"].server is not None)
    http, client = clients(fleet_config(first, second))
    await http.balancer.start()
    for i in range(4):
        await client.chat.completions.create(model="a", messages=chat(f"turn {i}"), max_tokens=2)
    assert first.app.models["a"].loads == 0
    assert http.balancer.backend("b1/a").requests == 4


async def test_waiting_longer_than_a_load_takes_loads_the_model_on_another_router(
    routers: Routers, clients: Clients
) -> None:
    first = routers({"a": 1}, load_s=0.1)
    second = routers({"a": 1}, load_s=0.1)
    http, client = clients(fleet_config(first, second))
    await http.balancer.start()
    await client.chat.completions.create(model="a", messages=chat("warm"), max_tokens=1)
    loaded_on = [r for r in (first, second) if r.app.models["a"].loads]
    assert len(loaded_on) == 1
    # One slot, long answers: requests that wait longer than the learned 0.1 s load go elsewhere.
    await asyncio.gather(
        *(client.chat.completions.create(model="a", messages=chat(f"q{i}"), max_tokens=40) for i in range(4))
    )
    assert first.app.models["a"].loads == 1
    assert second.app.models["a"].loads == 1
    assert http.balancer.snapshot().in_flight == 0


async def test_without_autoload_an_unloaded_model_is_refused_at_once(routers: Routers, clients: Clients) -> None:
    router = routers({"a": 2}, autoload=False)
    http, client = clients(fleet_config(router, queue_timeout_s=30))
    await http.balancer.start()
    assert not http.balancer.backend("b0/a").routable
    with pytest.raises(openai.APIStatusError) as caught:
        await asyncio.wait_for(client.chat.completions.create(model="a", messages=chat("hi"), max_tokens=2), 5)
    assert caught.value.status_code == 503
    assert "autoload off" in caught.value.message
    assert router.app.models["a"].loads == 0
    # Loaded by its operator, it is used.
    async with httpx2.AsyncClient() as raw:
        await raw.post(f"{router.url}/models/load", json={"model": "a"})
    await eventually(lambda: http.balancer.backend("b0/a").capacity == 2)
    reply = await client.chat.completions.create(model="a", messages=chat("hi"), max_tokens=2)
    assert reply.choices[0].message.content


async def test_an_unloaded_model_loses_its_prefix_cache_and_a_dead_router_its_models(
    routers: Routers, clients: Clients
) -> None:
    router = routers({"a": 2, "b": 2}, models_max=1, load_s=0.05)
    http, client = clients(fleet_config(router))
    balancer = http.balancer
    await balancer.start()
    system = "You review code. " * 200
    await client.chat.completions.create(model="a", messages=chat("one", system), max_tokens=2)
    child = balancer.backend("b0/a")
    await eventually(lambda: child.state is BackendState.HEALTHY)
    generation = child.generation
    assert balancer.scheduler.index.size("b0/a") > 0
    # Model b evicts a (models_max = 1): a is unloaded, its cache gone when it comes back.
    await client.chat.completions.create(model="b", messages=chat("two"), max_tokens=2)
    await eventually(lambda: child.state is BackendState.UNLOADED)
    await client.chat.completions.create(model="a", messages=chat("three", system), max_tokens=2)
    await eventually(lambda: child.state is BackendState.HEALTHY)
    assert child.generation > generation
    assert balancer.scheduler.index.size("b0/a") > 0, "the request that loaded it filled its cache"
    assert router.app.models["a"].loads == 2
    router.stop()
    children = [b for b in balancer.backends if b.router is not None]
    await eventually(lambda: all(c.state is BackendState.DEAD for c in children))
    assert balancer.snapshot().in_flight == 0


async def test_a_dead_router_refuses_its_models_after_the_grace(routers: Routers, clients: Clients) -> None:
    router = routers({"a": 2})
    http, client = clients(fleet_config(router, down_grace_s=0.2))
    await http.balancer.start()
    router.stop()
    child = http.balancer.backend("b0/a")
    await eventually(lambda: child.state is BackendState.DEAD)
    await asyncio.sleep(0.25)
    with pytest.raises(openai.APIStatusError) as caught:
        await asyncio.wait_for(client.chat.completions.create(model="a", messages=chat("hi"), max_tokens=2), 5)
    assert caught.value.status_code == 503
    assert "b0/a: dead" in caught.value.message
