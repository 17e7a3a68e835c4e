"""The engine alone, no HTTP: how fast it decides, how it scales, what a waiting request costs.

    python -m bench.scheduler [--backends 10,200,1000] [--waiting 10000] [--decisions 5000]

Every backend is full and requests wait; each measured decision is one slot given back, which
grants it through the scheduler and the (default) cost-aware policy: each request carries the
prompt blocks of one of 2,000 conversations (4 to 64 blocks), so the prefix index is populated,
holders are looked up and some requests park for the backend holding their prefix. Requests
arrive as ``Balancer.acquire`` queues them (a dispatch, then ``Scheduler.queued``, which parks a
request whose prefix a busy backend holds), and that arrival is timed too.
Also: decision time as the queue grows, memory per waiting request, and the package's import time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamacpp_ha import BackendConfig, BackendState, Balancer, BalancerConfig
from llamacpp_ha._leases import Lease
from llamacpp_ha._prompt import PromptShape
from llamacpp_ha._queue import Grant, Waiter, WaiterState

RESULTS = Path(__file__).parent / "results"
SLOTS = 4


def fleet(backends: int) -> Balancer:
    """A balancer whose backends look polled and healthy (nothing is ever sent to them)."""
    config = BalancerConfig(backends=[BackendConfig(url=f"http://b{i}.invalid:8080") for i in range(backends)])
    balancer = Balancer(config)
    for backend in balancer.backends:
        backend.reported_capacity = SLOTS
        backend.set_models(("model.gguf",))
        backend.state = BackendState.HEALTHY
    return balancer


CONVERSATIONS = 2_000


def prompt(rng: random.Random) -> PromptShape:
    conversation = rng.randrange(CONVERSATIONS)
    blocks = tuple(conversation.to_bytes(4, "little") + i.to_bytes(4, "little") for i in range(rng.randint(4, 64)))
    return PromptShape(blocks, len(blocks) * 512 + 100, 1)


def enqueue(balancer: Balancer, count: int, rng: random.Random) -> None:
    """Queue requests without a decision each (the first fill, and the memory measurement)."""
    now = time.monotonic()
    for _ in range(count):
        waiter = Waiter(balancer.queue.next_seq(), "model", Grant(), now, prompt=prompt(rng))
        balancer.queue.push(waiter)


def arrive(balancer: Balancer, rng: random.Random) -> tuple[float, bool]:
    """A request arriving at a full fleet, queued as ``Balancer.acquire`` queues it: the time it
    took, and whether it was parked for a busy backend holding its prefix."""
    waiter = Waiter(balancer.queue.next_seq(), "model", Grant(), time.monotonic(), prompt=prompt(rng))
    started = time.perf_counter()
    balancer.queue.push(waiter)
    balancer.scheduler.dispatch()
    if not waiter.grant.done():
        balancer.scheduler.queued(waiter)
    return time.perf_counter() - started, waiter.state is WaiterState.PARKED


def answering(balancer: Balancer, before: set[Lease]) -> list[Lease]:
    """The leases granted since ``before``, with their prompts processed (a first byte each): a full
    fleet is decoding, not prefilling, so no backend is closed by its prefill backlog
    (``prefill_backlog_s``) when a slot frees. A first byte may grant more: those too."""
    granted: list[Lease] = []
    while fresh := balancer.scheduler.leases - before - set(granted):
        for lease in fresh:
            granted.append(lease)
            lease.touch()
    return granted


@dataclass
class Timings:
    decisions: list[float] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    parked_on_arrival: int = 0


def run(balancer: Balancer, rounds: int, rng: random.Random) -> Timings:
    """Rounds of one slot given back and one request arriving, so the queue keeps its length."""
    leases: list[Lease] = list(balancer.scheduler.leases)
    timings = Timings()
    for _ in range(rounds):
        lease = leases.pop(rng.randrange(len(leases)))
        before = set(balancer.scheduler.leases)
        started = time.perf_counter()
        lease.release()  # gives the slot back and grants it to the oldest waiter
        timings.decisions.append(time.perf_counter() - started)
        leases += answering(balancer, before)
        before = set(balancer.scheduler.leases)
        took, parked = arrive(balancer, rng)
        timings.arrivals.append(took)
        timings.parked_on_arrival += parked
        leases += answering(balancer, before)
    return timings


async def measure(backends: int, waiting: int, decisions: int) -> dict[str, float]:
    rng = random.Random(3)
    balancer = fleet(backends)
    enqueue(balancer, backends * SLOTS, rng)  # fills every slot
    balancer.scheduler.dispatch()
    answering(balancer, set())
    enqueue(balancer, waiting, rng)
    run(balancer, decisions, rng)  # the prefix index fills and requests park as they would in a running fleet
    timings = run(balancer, decisions, rng)
    times = timings.decisions
    # A release may grant nothing (its waiters are parked elsewhere) or more than one (a slot left
    # free earlier): the queue ends near, not exactly at, the starting length.
    return {
        "backends": backends,
        "waiting": len(balancer.queue),
        "p50_us": statistics.median(times) * 1e6,
        "p99_us": _p99(times) * 1e6,
        "decisions_per_s": len(times) / sum(times),
        "arrival_p50_us": statistics.median(timings.arrivals) * 1e6,
        "arrival_p99_us": _p99(timings.arrivals) * 1e6,
        "parked_on_arrival": timings.parked_on_arrival / decisions,
    }


def _p99(times: list[float]) -> float:
    return sorted(times)[int(0.99 * len(times))]


async def memory_per_waiter(count: int) -> float:
    balancer = fleet(1)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    enqueue(balancer, count, random.Random(5))
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / count


def import_time_ms() -> float:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import llamacpp_ha"], capture_output=True, text=True, check=True
    )
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| llamacpp_ha$", line)
        if match:
            return int(match[1]) / 1000
    raise RuntimeError("llamacpp_ha not found in -X importtime output")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scheduler", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="10,200,1000")
    parser.add_argument("--waiting", type=int, default=10_000)
    parser.add_argument("--decisions", type=int, default=5_000)
    parser.add_argument("--output", type=Path, default=RESULTS / "scheduler.json")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {"by_backends": [], "by_waiting": []}
    for backends in (int(b) for b in args.backends.split(",")):
        row = asyncio.run(measure(backends, args.waiting, args.decisions))
        results["by_backends"].append(row)
        print(
            f"{backends:>5} backends, {args.waiting} waiting: p50 {row['p50_us']:6.1f} us, "
            f"p99 {row['p99_us']:6.1f} us, {row['decisions_per_s']:9.0f} decisions/s; arrival p50 "
            f"{row['arrival_p50_us']:5.1f} us, p99 {row['arrival_p99_us']:6.1f} us, "
            f"{row['parked_on_arrival']:.0%} parked on arrival",
            flush=True,
        )
    middle = sorted(int(b) for b in args.backends.split(","))[len(args.backends.split(",")) // 2]
    for waiting in (args.waiting // 10, args.waiting, args.waiting * 10):
        row = asyncio.run(measure(middle, waiting, args.decisions))
        results["by_waiting"].append(row)
        print(f"{middle:>5} backends, {waiting:>7} waiting: p50 {row['p50_us']:6.1f} us", flush=True)
    results["bytes_per_waiting_request"] = asyncio.run(memory_per_waiter(args.waiting))
    results["import_time_ms"] = import_time_ms()
    print(f"memory per waiting request: {results['bytes_per_waiting_request']:.0f} bytes")
    print(f"python -X importtime -c 'import llamacpp_ha': {results['import_time_ms']:.0f} ms")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
