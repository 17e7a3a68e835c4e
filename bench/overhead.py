"""Added latency of ha_client over a direct httpx2.AsyncClient to the same backend.

    python -m bench.overhead [--requests 1000] [--backend URL]

Both clients talk to one simulated llama-server that answers instantly (its own process, so
it does not share our event loop), or to ``--backend``. Requests alternate between the two
clients in random order, after a warm-up, so both see the same machine noise. Prints a table
and writes ``bench/results/overhead.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx2

from llamacpp_ha import BackendConfig, BalancerConfig, ha_client
from llamacpp_ha.sim import SimProcess

RESULTS = Path(__file__).parent / "results"
CHAT = {
    "model": "tiny-random-llama",
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 4,
}
STREAM = {**CHAT, "max_tokens": 100, "stream": True}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def timed(call: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


async def measure(url: str, requests: int, warmup: int, progress: bool) -> dict[str, Any]:
    direct = httpx2.AsyncClient(base_url=url, timeout=30)
    balanced = ha_client(BalancerConfig(backends=[BackendConfig(url=url)]), timeout=30)
    await balanced.balancer.start()

    def plain(client: httpx2.AsyncClient) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            response = await client.post("/v1/chat/completions", json=CHAT)
            response.raise_for_status()

        return call

    def streamed(client: httpx2.AsyncClient) -> Callable[[], Awaitable[None]]:
        async def call() -> None:
            async with client.stream("POST", "/v1/chat/completions", json=STREAM) as response:
                response.raise_for_status()
                async for _ in response.aiter_raw():
                    pass

        return call

    results: dict[str, Any] = {}
    rng = random.Random(1)
    for label, make, count in (("chat", plain, requests), ("stream-100", streamed, max(1, requests // 5))):
        samples: dict[str, list[float]] = {"direct": [], "ha_client": []}
        pairs = [(("direct", make(direct)), ("ha_client", make(balanced))) for _ in range(warmup + count)]
        for i, pair in enumerate(pairs):
            order = list(pair)
            rng.shuffle(order)
            for name, call in order:
                elapsed = await timed(call)
                if i >= warmup:
                    samples[name].append(elapsed)
            if progress and (i + 1) % max(1, len(pairs) // 10) == 0:
                print(f"  {label}: {i + 1}/{len(pairs)}", flush=True)
        deltas = [h - d for h, d in zip(samples["ha_client"], samples["direct"], strict=True)]
        results[label] = {
            "requests": count,
            "direct_p50_ms": percentile(samples["direct"], 50) * 1000,
            "direct_p99_ms": percentile(samples["direct"], 99) * 1000,
            "ha_p50_ms": percentile(samples["ha_client"], 50) * 1000,
            "ha_p99_ms": percentile(samples["ha_client"], 99) * 1000,
            "added_p50_ms": (percentile(samples["ha_client"], 50) - percentile(samples["direct"], 50)) * 1000,
            "added_p99_ms": (percentile(samples["ha_client"], 99) - percentile(samples["direct"], 99)) * 1000,
            "paired_delta_median_ms": statistics.median(deltas) * 1000,
        }
    await direct.aclose()
    await balanced.aclose()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--backend", help="a real llama-server URL instead of the instant simulator")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    if args.backend:
        results = asyncio.run(measure(args.backend, args.requests, args.warmup, not args.quiet))
    else:
        with SimProcess(slots=64, prefill_tokens_per_s=math.inf, decode_tokens_per_s=math.inf) as sim:
            results = asyncio.run(measure(sim.url, args.requests, args.warmup, not args.quiet))

    header = ("workload", "direct p50", "ha p50", "added p50", "added p99", "paired")
    print("\n{:<12} {:>11} {:>9} {:>10} {:>10} {:>8}".format(*header))
    for label, r in results.items():
        print(
            f"{label:<12} {r['direct_p50_ms']:9.3f}ms {r['ha_p50_ms']:7.3f}ms {r['added_p50_ms']:8.3f}ms "
            f"{r['added_p99_ms']:8.3f}ms {r['paired_delta_median_ms']:6.3f}ms"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overhead.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
