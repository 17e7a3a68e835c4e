"""The README's quickstart, runnable: two simulated llama-servers balanced by ha_client."""

from __future__ import annotations

import asyncio

from openai import AsyncOpenAI

from llamacpp_ha import BackendConfig, BalancerConfig, ha_client
from llamacpp_ha.sim import SimServer


async def main(url_a: str, url_b: str) -> None:
    cfg = BalancerConfig(backends=[BackendConfig(url=url_a), BackendConfig(url=url_b)])
    http = ha_client(cfg)  # an httpx2.AsyncClient
    client = AsyncOpenAI(base_url="http://llamacpp-ha/v1", api_key="unused", http_client=http)
    stream = await client.chat.completions.create(
        model="tiny-random-llama",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
        stream=True,
    )
    async for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()
    print(http.balancer.snapshot().model_dump_json(indent=2))
    await http.aclose()  # stops the engine's background polling


if __name__ == "__main__":
    with SimServer(slots=2) as a, SimServer(slots=2) as b:
        asyncio.run(main(a.url, b.url))
