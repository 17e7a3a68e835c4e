"""Two balancers in one process share nothing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from openai import AsyncOpenAI

import llamacpp_ha
from llamacpp_ha import HAAsyncClient
from llamacpp_ha.sim import SimServer

from .helpers import chat, fleet_config

pytestmark = pytest.mark.anyio

Sims = Callable[..., SimServer]
Clients = Callable[..., tuple[HAAsyncClient, AsyncOpenAI]]


async def test_two_balancers_share_nothing(sims: Sims, clients: Clients) -> None:
    sim = sims(slots=2)
    http_a, client_a = clients(fleet_config(sim))
    http_b, client_b = clients(fleet_config(sim, policy="least_busy"))
    for _ in range(3):
        await client_a.chat.completions.create(model="tiny-random-llama", messages=chat("a"), max_tokens=2, user="a")
    await client_b.chat.completions.create(model="tiny-random-llama", messages=chat("b"), max_tokens=2, user="b")

    a, b = http_a.balancer, http_b.balancer
    assert a is not b
    assert (a.snapshot().counters.requests, b.snapshot().counters.requests) == (3, 1)
    assert (a.snapshot().affinity_entries, b.snapshot().affinity_entries) == (1, 1)
    for attribute in ("backends", "stats", "queue", "affinity", "scheduler"):
        assert getattr(a, attribute) is not getattr(b, attribute), attribute
    assert a.scheduler.index is not b.scheduler.index
    assert a.scheduler.cost is not b.scheduler.cost

    await http_a.aclose()
    assert a.closed
    assert not b.closed
    completion = await client_b.chat.completions.create(model="tiny-random-llama", messages=chat("c"), max_tokens=2)
    assert completion.choices


def test_the_public_api_is_exactly_all() -> None:
    public = {name for name in dir(llamacpp_ha) if not name.startswith("_")}
    not_api = {"sim", "httpx", "demo", "annotations"}  # submodules imported on purpose; the __future__ import
    assert public - not_api == set(llamacpp_ha.__all__) - {"__version__"}
    assert llamacpp_ha.__all__ == sorted(llamacpp_ha.__all__)
