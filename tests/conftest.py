from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from openai import AsyncOpenAI

from llamacpp_ha import BalancerConfig, HAAsyncClient, ha_client
from llamacpp_ha.sim import SimServer

from .redis_process import REDIS, RedisProcess


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Tests that run the CLI configure logging: undo it, or a later test logs through a handler
    bound to an earlier test's closed capture stream (each record then prints a stack: slow)."""
    root = logging.getLogger()
    names = ("httpx2", "httpcore2", "httpx", "httpcore", "llamacpp_ha", "redis")
    saved = (root.handlers[:], root.level, {name: logging.getLogger(name).level for name in names})
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


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


@pytest.fixture
def redis_server() -> Iterator[RedisProcess]:
    """A redis-server of its own (no persistence) for the test; the shared-mode tests skip without one."""
    if REDIS is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    server = RedisProcess().start()
    yield server
    server.stop()
    shutil.rmtree(server.directory, ignore_errors=True)
