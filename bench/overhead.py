"""What the balancer costs per request: ha_client and llamacpp-ha-server against a direct client.

    python -m bench.overhead [--requests 1000] [--backend URL] [--no-proxy]

One simulated llama-server that answers instantly runs in its own process (or ``--backend``
is a real llama-server). Three clients call it side by side in one run: a direct
``httpx2.AsyncClient`` (the baseline), ``ha_client`` (in-process), and an httpx2 client through a
``llamacpp-ha-server`` process on loopback. Latency: requests alternate between the clients in
random order after a warm-up, so all see the same machine noise. Throughput: requests/s at
concurrency 1, 16 and 64. Prints tables and writes ``bench/results/overhead.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2

from llamacpp_ha import BackendConfig, BalancerConfig, ha_client
from llamacpp_ha.sim import SimProcess, free_port

from .fleet import percentile

RESULTS = Path(__file__).parent / "results"
CHAT = {"model": "tiny-random-llama", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
STREAM = {**CHAT, "max_tokens": 100, "stream": True}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

Call = Callable[[], Awaitable[None]]


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def process_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def proxy_process(backend_url: str) -> Iterator[tuple[str, int]]:
    """A llamacpp-ha-server process on a free loopback port in front of ``backend_url``."""
    port = free_port()
    config = {"backends": [{"url": backend_url}], "server": {"port": port}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(config, file)
    process = subprocess.Popen(
        [sys.executable, "-m", "llamacpp_ha_server", "--config", file.name, "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx2.TransportError):
                if httpx2.get(f"{url}/health").status_code == 200:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("llamacpp-ha-server did not start")
            time.sleep(0.05)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)
        os.unlink(file.name)


def plain(client: httpx2.AsyncClient) -> Call:
    async def call() -> None:
        (await client.post("/v1/chat/completions", json=CHAT)).raise_for_status()

    return call


def streamed(client: httpx2.AsyncClient) -> Call:
    async def call() -> None:
        async with client.stream("POST", "/v1/chat/completions", json=STREAM) as response:
            response.raise_for_status()
            async for _ in response.aiter_raw():
                pass

    return call


async def latency(calls: dict[str, Call], count: int, warmup: int, label: str, progress: bool) -> dict[str, Any]:
    samples: dict[str, list[float]] = {name: [] for name in calls}
    rng = random.Random(1)
    for i in range(warmup + count):
        order = list(calls.items())
        rng.shuffle(order)
        for name, call in order:
            started = time.perf_counter()
            await call()
            if i >= warmup:
                samples[name].append(time.perf_counter() - started)
        if progress and (i + 1) % max(1, (warmup + count) // 5) == 0:
            print(f"  latency {label}: {i + 1}/{warmup + count}", flush=True)
    base50, base99 = percentile(samples["direct"], 50), percentile(samples["direct"], 99)
    return {
        name: {
            "p50_ms": percentile(values, 50) * 1000,
            "p99_ms": percentile(values, 99) * 1000,
            "added_p50_ms": (percentile(values, 50) - base50) * 1000,
            "added_p99_ms": (percentile(values, 99) - base99) * 1000,
        }
        for name, values in samples.items()
    }


async def throughput(call: Call, concurrency: int, total: int) -> float:
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - started)


async def measure(backend: str, proxy: str | None, proxy_pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=128, keepalive_expiry=4.0)
    clients = {"direct": httpx2.AsyncClient(base_url=backend, timeout=60, limits=limits)}
    balanced = ha_client(BalancerConfig(backends=[BackendConfig(url=backend)]), timeout=60)
    await balanced.balancer.start()
    clients["ha_client"] = balanced
    if proxy is not None:
        clients["proxy"] = httpx2.AsyncClient(base_url=proxy, timeout=60, limits=limits)
    progress = not args.quiet
    results: dict[str, Any] = {"latency": {}, "throughput": {}}
    results["latency"]["chat"] = await latency(
        {n: plain(c) for n, c in clients.items()}, args.requests, args.warmup, "chat", progress
    )
    results["latency"]["stream-100"] = await latency(
        {n: streamed(c) for n, c in clients.items()},
        max(10, args.requests // 10),
        args.warmup // 10,
        "stream",
        progress,
    )
    for concurrency in (1, 16, 64):
        for name, client in clients.items():
            cpu_before = process_cpu_s(proxy_pid) if name == "proxy" and proxy_pid else None
            own_cpu_before = time.process_time()
            rate = await throughput(plain(client), concurrency, args.requests)
            # This process's CPU: the client's own work, plus the engine's for ha_client.
            entry: dict[str, Any] = {
                "requests_per_s": rate,
                "client_cpu_s_per_1000": (time.process_time() - own_cpu_before) * 1000 / args.requests,
            }
            if cpu_before is not None and proxy_pid is not None:
                entry["server_cpu_s_per_1000"] = (process_cpu_s(proxy_pid) - cpu_before) * 1000 / args.requests
            results["throughput"].setdefault(f"c{concurrency}", {})[name] = entry
            if progress:
                print(f"  throughput c={concurrency} {name}: {rate:.0f} req/s", flush=True)
    if proxy_pid is not None:
        results["proxy_peak_rss_mb"] = process_peak_rss_mb(proxy_pid)
    results["client_process_peak_rss_mb"] = process_peak_rss_mb(os.getpid())
    for client in clients.values():
        await client.aclose()
    return results


def report(results: dict[str, Any]) -> None:
    print(f"\n{'latency':<12} {'client':<10} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>10} {'added p99':>10}")
    for workload, by_client in results["latency"].items():
        for name, r in by_client.items():
            print(
                f"{workload:<12} {name:<10} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} "
                f"{r['added_p50_ms']:10.3f} {r['added_p99_ms']:10.3f}"
            )
    print(f"\n{'throughput':<12} {'client':<10} {'req/s':>8} {'client CPU s/1000':>18} {'server CPU s/1000':>18}")
    for concurrency, by_client in results["throughput"].items():
        for name, r in by_client.items():
            server = r.get("server_cpu_s_per_1000")
            print(
                f"{concurrency:<12} {name:<10} {r['requests_per_s']:8.0f} {r['client_cpu_s_per_1000']:18.3f} "
                f"{'' if server is None else f'{server:18.3f}'}"
            )
    print(f"\nclient process peak RSS: {results['client_process_peak_rss_mb']:.0f} MB")
    if "proxy_peak_rss_mb" in results:
        print(f"llamacpp-ha-server peak RSS: {results['proxy_peak_rss_mb']:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--backend", help="a real llama-server URL instead of the instant simulator")
    parser.add_argument("--no-proxy", action="store_true", help="skip llamacpp-ha-server")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS / "overhead.json")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        backend = (
            args.backend
            or stack.enter_context(
                SimProcess(slots=256, prefill_tokens_per_s=math.inf, decode_tokens_per_s=math.inf)
            ).url
        )
        proxy, pid = (None, None) if args.no_proxy else stack.enter_context(proxy_process(backend))
        results = asyncio.run(measure(backend, proxy, pid, args))
    report(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
