"""How fast real backends are under load, measured before a benchmark offers them a load.

The offered load of ``bench.fleet`` is a share of the fleet's capacity, computed from the
calibration in shared/calibration.md. Real llama-servers on another machine (or several sharing
its cores) run at their own speed: "80%" there can be past saturation, where every strategy only
queues. Measured first, with every slot of every backend busy at once as under load, the load
means the same on real backends as on simulated ones.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
from collections.abc import Mapping
from typing import Any

import httpx2

from .workload import DECODE_CONCURRENCY_EXPONENT, calibration_with, words

__all__ = ["measure_speed"]


async def _timings(client: httpx2.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(f"{url}/v1/chat/completions", json=body)
    response.raise_for_status()
    timings: dict[str, Any] = response.json()["timings"]
    return timings


async def measure_speed(
    urls: list[str], model: str, slots: int, *, rounds: int = 3, prompt_words: int = 400, max_tokens: int = 32,
    seed: int = 0,
) -> Mapping[str, float]:  # fmt: skip
    """The benchmark's calibration with the rates of ``urls`` in place: ``slots`` uncached requests
    to each backend, all at once, ``rounds`` times (the median round). A backend's prefill rate is
    its prompt tokens over the longest prefill (it batches them); its per-stream decode rate is the
    one the calibration's concurrency model turns into the output tokens/s its slots gave together."""
    rng = random.Random(seed)

    def body() -> dict[str, Any]:
        return {
            "model": model,
            "messages": [{"role": "user", "content": f"Probe {rng.random()}: " + words(rng, prompt_words)}],
            "max_tokens": max_tokens,
            "stream": False,
        }

    prefill: list[float] = []
    decode: list[float] = []
    async with httpx2.AsyncClient(timeout=600) as client:
        for _ in range(rounds):
            per_backend = await asyncio.gather(
                *(asyncio.gather(*(_timings(client, url, body()) for _ in range(slots))) for url in urls)
            )
            prefill.append(statistics.fmean(_prefill_rate(timings) for timings in per_backend))
            decode.append(statistics.fmean(_decode_rate(timings, slots) for timings in per_backend))
    return calibration_with(statistics.median(prefill), statistics.median(decode))


def _prefill_rate(timings: list[dict[str, Any]]) -> float:
    return float(sum(t["prompt_n"] for t in timings) / (max(t["prompt_ms"] for t in timings) / 1000))


def _decode_rate(timings: list[dict[str, Any]], slots: int) -> float:
    together = float(sum(t["predicted_n"] for t in timings) / (max(t["predicted_ms"] for t in timings) / 1000))
    return together / math.pow(slots, 1 - DECODE_CONCURRENCY_EXPONENT)
