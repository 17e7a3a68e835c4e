"""openai 1.x/2.x (classic httpx) and the sync client: the same balancer, runnable against the simulator."""

from __future__ import annotations

import asyncio

from openai import AsyncOpenAI, OpenAI

from llamacpp_ha import BackendConfig, BalancerConfig
from llamacpp_ha import httpx as classic
from llamacpp_ha.sim import SimServer


async def async_example(cfg: BalancerConfig) -> None:
    http = classic.ha_client(cfg)  # an httpx.AsyncClient
    client = AsyncOpenAI(base_url="http://llamacpp-ha/v1", api_key="unused", http_client=http)
    completion = await client.chat.completions.create(
        model="tiny-random-llama", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    print("async:", completion.choices[0].message.content)
    await http.aclose()


def sync_example(cfg: BalancerConfig) -> None:
    http = classic.ha_sync_client(cfg)  # an httpx.Client; the engine runs on a private event loop
    client = OpenAI(base_url="http://llamacpp-ha/v1", api_key="unused", http_client=http)
    stream = client.chat.completions.create(
        model="tiny-random-llama", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True
    )
    print("sync:", "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))
    http.close()


if __name__ == "__main__":
    with SimServer(slots=2) as a, SimServer(slots=2) as b:
        config = BalancerConfig(backends=[BackendConfig(url=a.url), BackendConfig(url=b.url)])
        asyncio.run(async_example(config))
        sync_example(config)
