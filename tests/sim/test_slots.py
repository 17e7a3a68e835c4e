"""The simulator's slot behaviour that a balancer relies on, checked over HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

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


def words(count: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + count))


async def test_the_ram_prompt_cache_is_bounded_in_bytes() -> None:
    # 1 MiB at 1 KiB per token holds 1,024 tokens: two 400-token prompts, not three.
    with SimServer(slots=1, cache_ram_mib=1, kv_bytes_per_token=1024) as sim:
        async with httpx2.AsyncClient(base_url=sim.url, timeout=10) as client:
            prompts = [words(400, start=1000 * i) for i in range(4)]
            for prompt in prompts:
                await client.post("/completion", json={"prompt": prompt, "n_predict": 1})
            stats = (await client.get("/sim/stats")).json()
            assert 0 < stats["ram_cache_tokens"] <= 1024
            # The slot now holds prompt 3; prompt 2 comes back from RAM, prompt 0 was evicted.
            recent = (await client.post("/completion", json={"prompt": prompts[2], "n_predict": 1})).json()
            oldest = (await client.post("/completion", json={"prompt": prompts[0], "n_predict": 1})).json()
    assert recent["timings"]["cache_n"] >= 400
    assert oldest["timings"]["cache_n"] <= 1


async def test_the_gpu_profile_prefills_on_its_calibrated_curve() -> None:
    # 8B on an H200: 16,000 tokens cold in about 855 ms; a 3,500-token cached prefix makes the
    # rest of a 4,096-token prompt cheap. Tokens are the simulator's words here.
    from llamacpp_ha.sim import SimConfig, SimulatedLlamaServer

    config = SimConfig.profile("gpu-8b", n_ctx=20_000, slots=2)
    with SimServer(SimulatedLlamaServer(config)) as sim:
        app = sim.app
        assert app.prefill_alone_s(16_000, 0) == pytest.approx(0.855, rel=0.05)
        assert app.prefill_alone_s(2_048, 0) == pytest.approx(0.087, rel=0.05)
        assert app.prefill_alone_s(596, 3_500) < app.prefill_alone_s(4_096, 0) / 4
        async with httpx2.AsyncClient(base_url=sim.url, timeout=30) as client:
            body = {"prompt": words(8_000), "n_predict": 1}
            cold = (await client.post("/completion", json=body)).json()
            warm = (await client.post("/completion", json=body | {"prompt": words(8_100)})).json()
    # 8,001 tokens (with <s>) alone: 3 + 0.041 n + 7.8e-7 n^2 ms = 381 ms.
    assert cold["timings"]["prompt_ms"] == pytest.approx(381, rel=0.25)
    assert warm["timings"]["cache_n"] >= 8_000
    assert warm["timings"]["prompt_ms"] < 60


def test_the_connection_is_closed_after_a_stream_as_llama_server_does() -> None:
    import socket

    with SimServer(slots=1) as sim:
        body = b'{"prompt": "hi", "n_predict": 3, "stream": true}'
        for path, closes in ((b"/completion", True), (b"/health", False)):
            with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as sock:
                is_stream = path == b"/completion"
                method = b"POST" if is_stream else b"GET"
                head = method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                sock.sendall(head + (b"Content-Length: %d\r\n\r\n" % len(body) + body if is_stream else b"\r\n"))
                received = b""
                while b"0\r\n\r\n" not in received and b'"ok"' not in received:
                    received += sock.recv(65536)
                assert b"keep-alive" in received.lower() or b"HTTP/1.1 200" in received
                sock.settimeout(1.0)
                try:
                    rest = sock.recv(1)
                except TimeoutError:
                    rest = None  # still open
                assert (rest == b"") is closes, path


async def _completion(client: httpx2.AsyncClient, prompt: str, n_predict: int = 1) -> dict[str, Any]:
    response = await client.post("/completion", json={"prompt": prompt, "n_predict": n_predict})
    body: dict[str, Any] = response.json()
    return body


async def test_a_saved_prompt_moves_into_the_slot_that_loads_it() -> None:
    # llama-server's server_prompt_cache::load erases what it loads: one saved copy serves one slot.
    with SimServer(slots=3, decode_tokens_per_s=50, cache_idle_slots=False) as sim:
        async with httpx2.AsyncClient(base_url=sim.url, timeout=10) as client:
            shared = words(300)
            await _completion(client, shared)  # slot 0 holds it
            await _completion(client, words(300, start=1000))  # slot 1 (least recently used)
            await _completion(client, words(300, start=2000))  # slot 2
            await _completion(client, words(300, start=3000))  # slot 0 again: its prompt is saved to RAM
            first = asyncio.create_task(_completion(client, shared + " first", n_predict=20))
            await asyncio.sleep(0.05)
            second = await _completion(client, shared + " second", n_predict=20)
            first_body = await first
    assert first_body["timings"]["cache_n"] >= 300, "loaded from the RAM cache"
    assert second["timings"]["cache_n"] <= 1, "the saved copy left the cache with the first request"


@pytest.mark.parametrize("cache_idle_slots", [True, False])
async def test_idle_slots_are_saved_when_a_task_starts(cache_idle_slots: bool) -> None:
    # --cache-idle-slots: starting any task saves the idle slots, so a prompt held by an idle slot
    # is also in RAM, and a second request with it finds it there while the first uses the slot.
    with SimServer(slots=3, decode_tokens_per_s=50, cache_idle_slots=cache_idle_slots) as sim:
        async with httpx2.AsyncClient(base_url=sim.url, timeout=10) as client:
            shared = words(300)
            await _completion(client, shared)  # slot 0
            other = asyncio.create_task(_completion(client, words(300, start=1000), n_predict=40))  # slot 1
            await asyncio.sleep(0.05)
            first = asyncio.create_task(_completion(client, shared + " first", n_predict=20))  # slot 0
            await asyncio.sleep(0.05)
            second = await _completion(client, shared + " second", n_predict=20)  # slot 2
            first_body = await first
            await other
    assert first_body["timings"]["cache_n"] >= 300
    if cache_idle_slots:
        assert second["timings"]["cache_n"] >= 300
    else:
        assert second["timings"]["cache_n"] <= 1


def test_the_ram_cache_keeps_no_prompt_inside_another_and_evicts_the_oldest() -> None:
    from llamacpp_ha.sim._prompt_cache import PromptCache

    cache = PromptCache(limit_tokens=10)
    abc = cache.save(list("abc"))
    assert abc == tuple("abc")
    assert cache.save(list("ab")) == abc, "held inside a longer saved prompt"
    abcde = cache.save(list("abcde"))
    assert abcde is not None
    assert not cache.holds(abc), "replaced by the longer prompt that contains it"
    xyz = cache.save(list("xyz"))
    assert xyz is not None
    assert (len(cache), cache.tokens) == (2, 8)
    cache.save(list("mnop"))  # 12 tokens: the oldest goes
    assert not cache.holds(abcde)
    assert cache.holds(xyz)
    assert cache.save(list("q" * 11)) is None, "longer than the whole cache"


def test_the_ram_cache_moves_the_best_match_into_the_slot() -> None:
    from llamacpp_ha.sim._prompt_cache import PromptCache

    cache = PromptCache(limit_tokens=100)
    for prompt in ("abcdefgh", "abxy", "zzzzz"):
        cache.save(list(prompt))
    assert cache.load(list("abcdefghij"), [], 0) == tuple("abcdefgh")
    assert cache.load(list("abcdefghij"), [], 0) == tuple("abxy"), "the first went into a slot"
    assert cache.load(list("zq"), list("zqqq"), 2) is None, "the slot already covers as much"
    assert cache.load(list("z" + "q" * 10), [], 0) is None, "keeps under a quarter of the saved prompt"
    assert len(cache) == 1
