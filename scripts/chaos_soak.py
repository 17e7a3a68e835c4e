"""Chaos soak: mixed traffic, cancelled clients and backends killed mid-flight; nothing may be lost.

    python scripts/chaos_soak.py [--requests 5000] [--face sdk|server] [--kill-every 10]

Three simulated llama-servers (each its own process) serve streamed and non-streamed chats
through ``ha_client`` (``--face sdk``) or a ``llamacpp-ha-server`` process (``--face server``).
A share of the clients cancel at a random moment; every ``--kill-every`` seconds one backend is
SIGKILLed and started again on the same port. At the end it checks, and exits 1 unless:

- every request ended in a response or a clean error in OpenAI's shape (nothing lost, no hang);
- the balancer holds no slot and every backend reports no busy slot (after a short settle);
- no request failed with 503 while another backend was up and nothing had reached the caller
  (every such failure is counted and listed).

Traffic goes to 127.0.0.1 only and is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx2

from llamacpp_ha import BackendConfig, BalancerConfig, ha_client
from llamacpp_ha.sim import SimProcess, free_port, free_ports


async def one(client: httpx2.AsyncClient, rng: random.Random, outcomes: Counter[str], cancel_share: float) -> None:
    stream = rng.random() < 0.5
    body = {
        "model": "tiny-random-llama",
        "messages": [{"role": "user", "content": f"question {rng.random()}"}],
        "max_tokens": rng.randint(4, 40),
        "stream": stream,
    }

    async def request() -> None:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            text = (await response.aread()).decode(errors="replace")
        if response.status_code == 200:
            outcomes["error event" if '"error"' in text and stream else "ok"] += 1
            return
        try:
            error = json.loads(text)["error"]
            assert {"message", "type", "code"} <= set(error)
            outcomes[f"{response.status_code} {error['code']}"] += 1
        except (ValueError, KeyError, AssertionError, TypeError):
            outcomes[f"{response.status_code} not in OpenAI's shape"] += 1

    task = asyncio.create_task(request())
    if rng.random() < cancel_share:
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        task.cancel()
    try:
        await asyncio.wait_for(task, timeout=60)
    except asyncio.CancelledError:
        outcomes["cancelled by the client"] += 1
    except TimeoutError:
        outcomes["LOST: no answer in 60 s"] += 1
    except httpx2.HTTPError as exc:
        outcomes[f"transport error {type(exc).__name__}"] += 1


async def killer(sims: list[SimProcess], every: float, stop: asyncio.Event, kills: list[str]) -> None:
    rng = random.Random(5)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every)
        if stop.is_set():
            return
        victim = rng.choice(sims)
        victim.kill()
        kills.append(victim.url)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(victim.start)


async def busy_everywhere(urls: list[str]) -> int:
    total = 0
    async with httpx2.AsyncClient(timeout=5) as http:
        for url in urls:
            slots = (await http.get(f"{url}/slots")).json()
            total += sum(slot["is_processing"] for slot in slots)
    return total


async def run(args: argparse.Namespace) -> int:
    sims = [
        SimProcess(port=port, slots=2, decode_tokens_per_s=400, prefill_tokens_per_s=50_000).launch()
        for port in free_ports(3)
    ]
    for sim in sims:
        sim.wait_ready()
    urls = [sim.url for sim in sims]
    config = BalancerConfig(backends=[BackendConfig(url=u) for u in urls], poll_interval_s=0.5, queue_timeout_s=30)
    server: subprocess.Popen[bytes] | None = None
    try:
        if args.face == "server":
            port = free_port()
            path = Path(tempfile.mkdtemp()) / "config.json"
            path.write_text(json.dumps({**json.loads(config.model_dump_json()), "server": {"port": port}}))
            command = [sys.executable, "-m", "llamacpp_ha_server", "--config", str(path), "--log-level", "warning"]
            server = await asyncio.to_thread(subprocess.Popen, command)
            client = httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60)
            for _ in range(100):
                with contextlib.suppress(httpx2.HTTPError):
                    if (await client.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
        else:
            client = ha_client(config, timeout=60)
        outcomes: Counter[str] = Counter()
        rng = random.Random(11)
        stop = asyncio.Event()
        kills: list[str] = []
        killing = asyncio.create_task(killer(sims, args.kill_every, stop, kills))
        started = time.monotonic()
        semaphore = asyncio.Semaphore(args.concurrency)

        async def bounded() -> None:
            async with semaphore:
                await one(client, rng, outcomes, args.cancel_share)

        async def report() -> None:
            while not stop.is_set():
                await asyncio.sleep(5)
                print(f"  {sum(outcomes.values())} done, {time.monotonic() - started:.0f} s, {dict(outcomes)}")

        reporting = asyncio.create_task(report())
        await asyncio.gather(*(bounded() for _ in range(args.requests)))
        stop.set()
        reporting.cancel()
        await killing
        elapsed = time.monotonic() - started
        await asyncio.sleep(2.0)  # let the last polls and cancellations settle
        in_flight = None if args.face == "server" else client.balancer.snapshot().in_flight  # type: ignore[attr-defined]
        busy = await busy_everywhere(urls)
        await client.aclose()
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        for sim in sims:
            sim.kill()

    lost = sum(n for k, n in outcomes.items() if k.startswith("LOST") or "not in OpenAI's shape" in k)
    # Two of three backends are always up: a 5xx of ours means a request failed that could have been served.
    failed = sum(n for k, n in outcomes.items() if k[:1] == "5" or k.startswith("transport error"))
    print(f"\n{args.requests} requests through the {args.face} in {elapsed:.0f} s, {len(kills)} backend kills")
    for outcome, count in outcomes.most_common():
        print(f"  {count:6d}  {outcome}")
    print(f"  balancer slots held afterwards: {in_flight if in_flight is not None else 'n/a (server)'}")
    print(f"  busy slots on the backends afterwards: {busy}")
    ok = lost == 0 and failed == 0 and busy == 0 and (in_flight in (0, None))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--cancel-share", type=float, default=0.15)
    parser.add_argument("--kill-every", type=float, default=10.0)
    parser.add_argument("--face", choices=["sdk", "server"], default="sdk")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
