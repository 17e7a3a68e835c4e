"""Several balancers sharing one fleet through a real redis-server (started here, on 127.0.0.1).

Each balancer is its own engine with its own Redis connections, as in separate processes; one
test runs a balancer in a child process and SIGKILLs it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import pytest
from openai import AsyncOpenAI

from llamacpp_ha import BalancerConfig, SharedConfig, ha_client
from llamacpp_ha._client import HAAsyncClient
from llamacpp_ha.sim import SimServer

from .helpers import chat, eventually, fleet_config
from .redis_process import NAMESPACE, REDIS, RedisProcess

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (Debian: apt-get install redis-server)"),
]


def shared_config(redis_server: RedisProcess, *sims: SimServer, **settings: Any) -> BalancerConfig:
    shared = SharedConfig(
        url=redis_server.url,
        namespace=NAMESPACE,
        lease_ttl_s=settings.pop("lease_ttl_s", 3.0),
        timeout_s=1.0,
        retry_interval_s=0.2,
    )
    return fleet_config(*sims, shared=shared, **settings)


@pytest.fixture
async def balancers() -> AsyncIterator[list[HAAsyncClient]]:
    made: list[HAAsyncClient] = []
    yield made
    for client in made:
        await client.aclose()


async def two_balancers(
    redis_server: RedisProcess, sim: SimServer, balancers: list[HAAsyncClient]
) -> tuple[HAAsyncClient, HAAsyncClient]:
    """Two balancers sharing ``sim`` through Redis, started (closed by the ``balancers`` fixture)."""
    a, b = (ha_client(shared_config(redis_server, sim)) for _ in range(2))
    balancers += [a, b]
    for http in (a, b):
        await http.balancer.start()
    return a, b


async def sim_stats(sim: SimServer) -> dict[str, Any]:
    async with httpx2.AsyncClient() as client:
        stats: dict[str, Any] = (await client.get(f"{sim.url}/sim/stats")).json()
        return stats


async def stream_chat(client: AsyncOpenAI, content: str, max_tokens: int = 16) -> str:
    stream = await client.chat.completions.create(
        model="tiny-random-llama", messages=chat(content), max_tokens=max_tokens, stream=True
    )
    parts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    return "".join(parts)


async def test_three_balancers_never_fill_a_backend_past_its_slots(
    sims: Any, redis_server: RedisProcess, balancers: list[HAAsyncClient]
) -> None:
    fleet = [sims(slots=2, decode_tokens_per_s=400, prefill_tokens_per_s=20_000) for _ in range(4)]
    for _ in range(3):
        balancers.append(ha_client(shared_config(redis_server, *fleet, queue_timeout_s=60)))
    for http in balancers:
        await http.balancer.start()
    clients = [AsyncOpenAI(base_url="http://llamacpp-ha/v1", api_key="-", http_client=http) for http in balancers]
    replies = await asyncio.gather(*(stream_chat(clients[i % 3], f"request {i}") for i in range(200)))
    assert all(replies)
    assert [http.balancer.snapshot().shared.fallbacks for http in balancers] == [0, 0, 0]  # type: ignore[union-attr]
    stats = [await sim_stats(sim) for sim in fleet]
    # Without shared leases each balancer would fill every backend's 2 slots: up to 6 running
    # on a 2-slot backend, 4 of them deferred inside it.
    assert [s["peak_deferred"] for s in stats] == [0, 0, 0, 0]
    assert sum(s["requests"] for s in stats) == 200
    for http in balancers:
        snapshot = http.balancer.snapshot()
        assert snapshot.shared is not None
        assert snapshot.shared.state == "shared"
        assert snapshot.in_flight == 0
        shared = http.balancer.shared
        assert shared is not None
        await eventually(partial(lambda fleet: len(fleet.replicas) == 3, shared))
    await eventually(lambda: all(redis_server.leases(f"b{i}") == 0 for i in range(4)))


async def test_a_freed_slot_goes_to_the_oldest_waiter_of_any_balancer(
    sims: Any, redis_server: RedisProcess, balancers: list[HAAsyncClient]
) -> None:
    # One slot. B runs a request; A's request waits for the slot, then B gets a younger one.
    # When B's request ends, B's own waiter is one step from the slot (a local release grants at
    # once) but A's is older: it must go first.
    a, b = await two_balancers(redis_server, sims(slots=1, decode_tokens_per_s=50), balancers)
    started: dict[str, float] = {}

    async def run(name: str, http: HAAsyncClient, tokens: int) -> None:
        body = {"model": "tiny-random-llama", "prompt": name, "max_tokens": tokens, "stream": True}
        async with http.stream("POST", "http://llamacpp-ha/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for _ in response.aiter_bytes():
                started.setdefault(name, time.monotonic())

    first = asyncio.create_task(run("first", b, 20))
    await eventually(lambda: "first" in started)
    older = asyncio.create_task(run("older", a, 2))
    await eventually(lambda: len(a.balancer.queue) == 1)
    await asyncio.sleep(0.05)  # its place in the fleet's line reaches Redis
    younger = asyncio.create_task(run("younger", b, 2))
    await eventually(lambda: len(b.balancer.queue) == 1)
    await asyncio.gather(first, older, younger)
    assert started["older"] < started["younger"]
    shared = b.balancer.shared
    assert shared is not None
    assert shared.deferred >= 1
    for http in (a, b):
        assert http.balancer.snapshot().in_flight == 0
    await eventually(lambda: redis_server.leases("b0") == 0)


async def test_a_conversation_alternating_between_balancers_keeps_its_backend(
    sims: Any, redis_server: RedisProcess, balancers: list[HAAsyncClient]
) -> None:
    fleet = [sims(slots=2) for _ in range(3)]
    for _ in range(2):
        balancers.append(ha_client(shared_config(redis_server, *fleet)))
    for http in balancers:
        await http.balancer.start()
    system = "You plan trips. " + " ".join(f"Rule {i}: be exact." for i in range(60))
    messages: list[Any] = [{"role": "system", "content": system}, {"role": "user", "content": "Plan Rome."}]
    served: list[str] = []
    for turn in range(6):
        http = balancers[turn % 2]
        response = await http.post(
            "http://llamacpp-ha/v1/chat/completions",
            json={"model": "tiny-random-llama", "messages": messages, "max_tokens": 8},
        )
        assert response.status_code == 200, response.text
        served.append(response.headers["x-llamacpp-ha-backend"])
        reply = response.json()["choices"][0]["message"]["content"]
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"Day {turn + 2}?"}]
        if turn < 5:
            # The next turn goes to the other balancer: it learns of this one by the channel.
            other = balancers[(turn + 1) % 2].balancer
            await eventually(partial(lambda index, name: index.size(name) > 0, other.scheduler.index, served[-1]))
    assert served == [served[0]] * 6
    # Explicit pins travel too.
    first = await balancers[0].post(
        "http://llamacpp-ha/v1/completions",
        json={"model": "tiny-random-llama", "prompt": "hi", "max_tokens": 2},
        headers={"X-Session-Id": "session-7"},
    )
    pinned = first.headers["x-llamacpp-ha-backend"]
    await eventually(lambda: balancers[1].balancer.affinity.get("session:session-7") == pinned)


async def test_a_balancer_killed_mid_stream_gives_its_slots_back_within_the_ttl(
    sims: Any, redis_server: RedisProcess, balancers: list[HAAsyncClient], tmp_path: Path
) -> None:
    sim = sims(slots=2, decode_tokens_per_s=5)
    config = shared_config(redis_server, sim, lease_ttl_s=1.5)
    script = tmp_path / "holder.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, json, sys
            from llamacpp_ha import BalancerConfig, ha_client

            async def main():
                http = ha_client(BalancerConfig(**json.loads({json.dumps(config.model_dump_json())})))
                body = {{"model": "tiny-random-llama", "prompt": "x", "max_tokens": 500, "stream": True}}
                async def hold():
                    async with http.stream("POST", "http://llamacpp-ha/v1/completions", json=body) as response:
                        async for _ in response.aiter_bytes():
                            print("streaming", flush=True)
                            await asyncio.sleep(3600)
                await asyncio.gather(hold(), hold())

            asyncio.run(main())
            """
        )
    )
    holder = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        assert holder.stdout is not None
        for _ in range(2):
            line = await asyncio.wait_for(holder.stdout.readline(), timeout=30)
            assert line.strip() == b"streaming"
        assert redis_server.leases("b0") == 2
        holder.send_signal(signal.SIGKILL)
        await holder.wait()
        killed_at = time.monotonic()
        await eventually(lambda: redis_server.leases("b0") == 0, timeout=5)
        assert time.monotonic() - killed_at <= 1.5 + 0.5
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
    # A surviving balancer gets both slots.
    http = ha_client(config)
    balancers.append(http)
    body = {"model": "tiny-random-llama", "prompt": "x", "max_tokens": 1}
    responses = await asyncio.gather(*(http.post("http://llamacpp-ha/v1/completions", json=body) for _ in range(2)))
    assert [r.status_code for r in responses] == [200, 200]
    assert http.balancer.snapshot().in_flight == 0


async def test_requests_keep_succeeding_while_redis_is_down_then_sharing_resumes(
    sims: Any, redis_server: RedisProcess, balancers: list[HAAsyncClient]
) -> None:
    sim = sims(slots=2)
    http = ha_client(shared_config(redis_server, sim))
    balancers.append(http)
    await http.balancer.start()
    body = {"model": "tiny-random-llama", "prompt": "hello", "max_tokens": 2}

    async def ok() -> None:
        response = await http.post("http://llamacpp-ha/v1/completions", json=body)
        assert response.status_code == 200, response.text

    await ok()
    shared = http.balancer.shared
    assert shared is not None
    assert shared.state == "shared"
    redis_server.stop()
    started = time.monotonic()
    for _ in range(10):
        await ok()
    assert time.monotonic() - started < 5  # no request waits out Redis timeouts one after another
    await eventually(lambda: shared.state == "local")
    snapshot = http.balancer.snapshot().shared
    assert snapshot is not None
    assert snapshot.fallbacks == 1
    assert "unreachable" in snapshot.reason
    redis_server.start()
    await eventually(lambda: shared.state == "shared", timeout=10)
    async with http.stream("POST", "http://llamacpp-ha/v1/completions", json=body | {"stream": True}) as response:
        assert response.status_code == 200
        await eventually(lambda: redis_server.leases("b0") == 1)
        await response.aread()
    await eventually(lambda: redis_server.leases("b0") == 0)
    assert http.balancer.snapshot().in_flight == 0


async def test_an_aborted_stream_and_a_cancelled_waiter_leave_nothing_in_redis(
    sims: Any, redis_server: RedisProcess, balancers: list[HAAsyncClient]
) -> None:
    a, b = await two_balancers(redis_server, sims(slots=1, decode_tokens_per_s=20), balancers)
    body = {"model": "tiny-random-llama", "prompt": "x", "max_tokens": 200, "stream": True}
    async with a.stream("POST", "http://llamacpp-ha/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert redis_server.leases("b0") == 1
        # B's request waits for the slot (held through Redis), then is cancelled.
        waiting = asyncio.create_task(b.post("http://llamacpp-ha/v1/completions", json=body | {"stream": False}))
        await eventually(lambda: redis_server.waiting("tiny-random-llama") == 1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        async for _ in response.aiter_bytes():
            break  # the consumer walks away mid-stream
    await eventually(lambda: redis_server.leases("b0") == 0)
    await eventually(lambda: redis_server.waiting("tiny-random-llama") == 0)
    for http in (a, b):
        assert http.balancer.snapshot().in_flight == 0
        assert len(http.balancer.queue) == 0


def test_shared_mode_is_configured_by_section_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMACPP_HA_SHARED__URL", "redis://127.0.0.1:6379/2")
    config = BalancerConfig.model_validate({"backends": [{"url": "http://127.0.0.1:8080"}]})
    assert config.shared is not None
    assert config.shared.url == "redis://127.0.0.1:6379/2"
    assert config.shared.lease_ttl_s == 10.0
    monkeypatch.delenv("LLAMACPP_HA_SHARED__URL")
    with pytest.raises(ValueError, match="url"):
        BalancerConfig.model_validate({"backends": [{"url": "http://h:1"}], "shared": {"url": "http://not-redis"}})
    plain = BalancerConfig.model_validate({"backends": [{"url": "http://h:1"}]})
    assert json.loads(plain.model_dump_json())["shared"] is None
