"""Shared mode (Redis): what it costs per request, and how far its order strays from global FIFO.

    python -m bench.shared [--requests 2000] [--redis URL]

Starts a redis-server on 127.0.0.1 (Debian's package; or give ``--redis``) and simulated
llama-servers, each in its own process.

- **Cost.** One backend that answers at once; requests alternate, in random order, between an
  embedded ``ha_client`` and one in shared mode, so both see the same machine noise. The
  difference of the medians is what shared mode adds (one Redis round trip to admit, the
  release sent in the background).
- **Order.** Three balancers in shared mode over one backend with 2 slots, saturated: requests
  arrive one every few milliseconds at the three balancers in turn. Each request's start (its
  first byte) is compared with its arrival: the share of pairs served out of arrival order,
  and how many places a request lost at most. One embedded balancer taking all the requests is
  the reference (global FIFO by construction).

Prints a table and writes ``bench/results/shared.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llamacpp_ha import BackendConfig, BalancerConfig, SharedConfig, ha_client
from llamacpp_ha.sim import SimProcess, free_port

from .fleet import percentile

RESULTS = Path(__file__).parent / "results"
BODY = {"model": "tiny-random-llama", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian: apt-get install redis-server), or pass --redis URL")
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = subprocess.Popen([*command, "--dir", directory], stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("redis-server did not start") from None
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.kill()
            process.wait()


def config(urls: list[str], redis: str | None, namespace: str) -> BalancerConfig:
    shared = SharedConfig(url=redis, namespace=namespace) if redis else None
    backends = [BackendConfig(url=url, name=f"b{i}") for i, url in enumerate(urls)]
    return BalancerConfig(backends=backends, shared=shared, poll_interval_s=0.5, queue_timeout_s=600)


async def cost(redis: str, requests: int) -> dict[str, Any]:
    sim = SimProcess(slots=64, prefill_tokens_per_s=math.inf, decode_tokens_per_s=math.inf).start()
    clients = {
        "embedded": ha_client(config([sim.url], None, "cost")),
        "shared": ha_client(config([sim.url], redis, "cost")),
    }
    latencies: dict[str, list[float]] = {name: [] for name in clients}
    try:
        for http in clients.values():
            await http.balancer.start()
            for _ in range(50):  # warm-up: connections, learned rates
                (await http.post("http://llamacpp-ha/v1/chat/completions", json=BODY)).raise_for_status()
        order = [name for name in clients for _ in range(requests)]
        random.Random(7).shuffle(order)
        for done, name in enumerate(order, 1):
            started = time.perf_counter()
            (await clients[name].post("http://llamacpp-ha/v1/chat/completions", json=BODY)).raise_for_status()
            latencies[name].append(time.perf_counter() - started)
            if done % 500 == 0:
                print(f"  cost: {done}/{len(order)} requests", flush=True)
    finally:
        for http in clients.values():
            await http.aclose()
        sim.kill()
    modes = {
        name: {"p50_ms": 1000 * percentile(values, 50), "p99_ms": 1000 * percentile(values, 99)}
        for name, values in latencies.items()
    }
    return {
        **modes,
        "added_p50_ms": modes["shared"]["p50_ms"] - modes["embedded"]["p50_ms"],
        "added_p99_ms": modes["shared"]["p99_ms"] - modes["embedded"]["p99_ms"],
    }


async def order(redis: str | None, balancers: int, requests: int, gap_s: float) -> dict[str, Any]:
    sim = SimProcess(slots=2, prefill_tokens_per_s=math.inf, decode_tokens_per_s=400).start()
    namespace = f"order-{random.random()}"
    clients = [ha_client(config([sim.url], redis, namespace)) for _ in range(balancers)]
    arrivals: list[float] = [0.0] * requests
    starts: list[float] = [0.0] * requests
    body = {**BODY, "max_tokens": 8, "stream": True}

    async def one(i: int) -> None:
        await asyncio.sleep(i * gap_s)
        arrivals[i] = time.monotonic()
        http = clients[i % balancers]
        async with http.stream("POST", "http://llamacpp-ha/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"request {i}: {response.status_code} {(await response.aread()).decode()}")
            async for _ in response.aiter_bytes():
                if not starts[i]:
                    starts[i] = time.monotonic()

    try:
        for http in clients:
            await http.balancer.start()
        await asyncio.gather(*(one(i) for i in range(requests)))
    finally:
        for http in clients:
            await http.aclose()
        sim.kill()
    by_arrival = sorted(range(requests), key=lambda i: arrivals[i])
    served_rank = {i: rank for rank, i in enumerate(sorted(range(requests), key=lambda i: starts[i]))}
    inversions = sum(
        1
        for a in range(requests)
        for b in range(a + 1, requests)
        if served_rank[by_arrival[a]] > served_rank[by_arrival[b]]
    )
    pairs = requests * (requests - 1) // 2
    lost = [served_rank[i] - rank for rank, i in enumerate(by_arrival)]
    waits = [starts[i] - arrivals[i] for i in range(requests)]
    return {
        "balancers": balancers,
        "shared": redis is not None,
        "requests": requests,
        "out_of_order_pairs": inversions / pairs,
        "max_places_lost": max(lost),
        "wait_p50_s": percentile(waits, 50),
        "wait_max_s": max(waits),
    }


async def run(args: argparse.Namespace, redis: str) -> dict[str, Any]:
    print(f"cost: {args.requests} requests each, embedded and shared, interleaved", flush=True)
    measured_cost = await cost(redis, args.requests)
    print(f"order: {args.order_requests} requests on one 2-slot backend, saturated", flush=True)
    reference = await order(None, 1, args.order_requests, args.gap_s)
    shared = await order(redis, 3, args.order_requests, args.gap_s)
    return {"cost": measured_cost, "order": [reference, shared]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.shared", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per mode for the cost")
    parser.add_argument("--order-requests", type=int, default=300)
    parser.add_argument("--gap-s", type=float, default=0.005, help="time between arrivals in the order run")
    parser.add_argument("--redis", help="a running Redis instead of starting redis-server")
    parser.add_argument("--output", type=Path, default=RESULTS / "shared.json")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        redis = args.redis or stack.enter_context(redis_server())
        results = asyncio.run(run(args, redis))
    c = results["cost"]
    print("\n| mode | p50 ms | p99 ms |\n|---|---:|---:|")
    for name in ("embedded", "shared"):
        print(f"| {name} | {c[name]['p50_ms']:.2f} | {c[name]['p99_ms']:.2f} |")
    print(f"shared mode adds {c['added_p50_ms']:.2f} ms at p50 ({c['added_p99_ms']:.2f} ms at p99); target <= 1 ms p50")
    print("\n| balancers | mode | pairs out of arrival order | most places lost | wait p50 s | wait max s |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in results["order"]:
        mode = "shared" if row["shared"] else "embedded"
        print(
            f"| {row['balancers']} | {mode} | {100 * row['out_of_order_pairs']:.1f}% | {row['max_places_lost']} "
            f"| {row['wait_p50_s']:.2f} | {row['wait_max_s']:.2f} |"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.output.write_text(json.dumps({"settings": settings, **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
