"""The simulator's slot behaviour that a balancer relies on, checked over HTTP."""

from __future__ import annotations

import asyncio

import httpx2
import pytest

from llamacpp_ha.sim import SimServer

pytestmark = pytest.mark.anyio

PROMPT = "Once upon a time " + " ".join(["alpha bravo castle delta"] * 20)


def metric(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(f"llamacpp:{name} "))
    return float(line.split()[1])


async def test_requests_beyond_the_slots_are_deferred_and_counted() -> None:
    with SimServer(slots=1, decode_tokens_per_s=100) as sim:
        async with httpx2.AsyncClient(base_url=sim.url, timeout=10) as client:
            body = {"prompt": "hi", "n_predict": 30}
            running = [asyncio.create_task(client.post("/completion", json=body)) for _ in range(3)]
            await asyncio.sleep(0.1)
            metrics = (await client.get("/metrics")).text
            slots = (await client.get("/slots")).json()
            assert metric(metrics, "requests_processing") == 1
            assert metric(metrics, "requests_deferred") == 2
            assert [slot["is_processing"] for slot in slots] == [True]  # deferred ones are invisible here
            responses = await asyncio.gather(*running)
            assert [r.status_code for r in responses] == [200, 200, 200]
            assert sim.app.pool.peak_deferred == 2
            stats = (await client.get("/sim/stats")).json()
            assert (stats["deferred_total"], stats["peak_deferred"], stats["requests"]) == (2, 2, 3)
            assert metric((await client.get("/metrics")).text, "requests_deferred") == 0


async def test_a_repeated_prefix_comes_from_the_cache() -> None:
    with SimServer(slots=2) as sim:
        async with httpx2.AsyncClient(base_url=sim.url, timeout=10) as client:
            first = (await client.post("/completion", json={"prompt": PROMPT, "n_predict": 2})).json()
            again = (await client.post("/completion", json={"prompt": PROMPT + " more", "n_predict": 2})).json()
            cold = (await client.post("/completion", json={"prompt": PROMPT, "cache_prompt": False})).json()
    assert first["timings"]["cache_n"] == 0
    assert again["timings"]["cache_n"] >= len(PROMPT.split())
    assert again["timings"]["prompt_n"] <= 3
    assert cold["timings"]["cache_n"] == 0


async def test_a_pinned_slot_waits_even_when_another_is_idle() -> None:
    with SimServer(slots=2, decode_tokens_per_s=100) as sim:
        async with httpx2.AsyncClient(base_url=sim.url, timeout=10) as client:
            first = asyncio.create_task(client.post("/completion", json={"prompt": "a", "n_predict": 20, "id_slot": 0}))
            await asyncio.sleep(0.05)
            # id_slot 2 wraps to slot 0 (2 % 2), which is busy: deferred though slot 1 is idle.
            second = asyncio.create_task(client.post("/completion", json={"prompt": "b", "n_predict": 2, "id_slot": 2}))
            await asyncio.sleep(0.05)
            assert metric((await client.get("/metrics")).text, "requests_deferred") == 1
            assert (await second).json()["id_slot"] == 0
            await first


async def test_loading_phase_answers_503_everywhere() -> None:
    with SimServer(loading_s=30, api_key="k") as sim, httpx2.Client(base_url=sim.url) as client:
        for path in ("/health", "/v1/models", "/slots", "/props"):
            response = client.get(path)
            assert response.status_code == 503
            assert response.json()["error"]["message"] == "Loading model"
