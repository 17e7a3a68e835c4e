from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from openai import AsyncOpenAI

from llamacpp_ha import BalancerConfig, HAAsyncClient, ha_client
from llamacpp_ha.sim import SimServer


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sims() -> Iterator[Callable[..., SimServer]]:
    """Start simulated llama-servers on 127.0.0.1 (real sockets); all are stopped after the test."""
    started: list[SimServer] = []

    def start(**config: Any) -> SimServer:
        server = SimServer(**config).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[[BalancerConfig], tuple[HAAsyncClient, AsyncOpenAI]]]:
    """Build ``ha_client`` + ``AsyncOpenAI`` pairs that are closed after the test."""
    made: list[HAAsyncClient] = []

    def make(config: BalancerConfig) -> tuple[HAAsyncClient, AsyncOpenAI]:
        http = ha_client(config)
        made.append(http)
        return http, AsyncOpenAI(base_url="http://llamacpp-ha/v1", api_key="unused", http_client=http)

    yield make
    for http in made:
        await http.aclose()
