"""Scheduling quality: one request trace through each strategy, over a calibrated simulated fleet.

    python -m bench.fleet [--loads 0.5,0.8,0.95,1.2] [--duration 12] [--speedup 8]
                          [--backends-count 4 --slots 4] [--heterogeneous] [--strategies ...]
    python -m bench.fleet --backends http://gpu-1:8080,http://gpu-2:8080 --model NAME --speedup 1

(the second against real llama-servers, in real time; they keep their caches from cell to cell,
so run one strategy per fresh fleet. Their speed is measured first, every slot busy at once, and
loads are shares of the capacity that gives, not of the calibration's; ``--rates`` replays a
measuring run's trace, ``--calibrated`` keeps the calibration's).

Each (load, strategy) cell starts a fresh fleet (empty caches), replays the same seeded trace
(multi-turn sessions with think time, tenants with long system prompts, one-shots; Poisson
arrivals at a share of the fleet's cold capacity) and measures what clients see. The simulated
backends follow shared/calibration.md (llama-server, 200M model, 2 CPU cores) run ``--speedup``
times faster; reported times are scaled back. Offered load is a share of the requests/s the fleet
serves when each prompt is processed only past the prefix an ideal router finds in cache (the
cold-cache capacity is printed too). Writes bench/results/fleet.json and fleet.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx2

from llamacpp_ha.sim import SimProcess, free_ports

from .speed import measure_speed
from .strategies import STRATEGIES, Strategy, make_strategy
from .workload import CALIBRATION, Session, Trace, calibration_with, make_trace

RESULTS = Path(__file__).parent / "results"
SIM_MODEL = "tiny-random-llama"


@dataclass
class Record:
    sent: float
    headers: float = math.nan
    first_token: float = math.nan
    end: float = math.nan
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str | None = None


@dataclass
class Cell:
    load: float
    strategy: str
    requests: int
    errors: int
    ttft_p50_s: float
    ttft_p95_s: float
    ttft_p99_s: float
    e2e_p50_s: float
    e2e_p99_s: float
    output_tokens_per_s: float
    cached_share: float
    """Prompt tokens served from cache, of all prompt tokens."""
    cached_vs_oracle: float
    deferred_in_backends: int | None
    wait_p99_s: float
    """Time to response headers: the wait for a slot, in our queue or inside llama-server."""
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


async def one_request(strategy: Strategy, body: dict[str, Any], clock: asyncio.AbstractEventLoop) -> Record:
    record = Record(sent=clock.time())
    try:
        async with strategy.stream(body) as response:
            record.headers = clock.time()
            if response.status_code != 200:
                await response.aread()
                record.error = f"HTTP {response.status_code}"
                return record
            async for line in response.aiter_lines():
                if '"content":"' in line:
                    record.output_tokens += 1
                    if math.isnan(record.first_token):
                        record.first_token = clock.time()
                elif '"usage"' in line:
                    usage = json.loads(line.removeprefix("data: "))["usage"]
                    record.prompt_tokens = usage["prompt_tokens"]
                    record.cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                elif line.startswith('data: {"error"'):
                    record.error = "error event"
        record.end = clock.time()
    except httpx2.HTTPError as exc:
        record.error = type(exc).__name__
    return record


async def replay(
    trace: Trace, strategy: Strategy, speedup: float, deadline_s: float, model: str = SIM_MODEL
) -> tuple[list[Record], float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    records: list[Record] = []

    async def run_session(session: Session, index: int) -> None:
        await asyncio.sleep(max(0.0, started + session.start_s / speedup - loop.time()))
        for turn in range(len(session.user_messages)):
            body = {
                "model": model, "messages": session.messages(turn), "max_tokens": session.max_tokens,
                "stream": True, "stream_options": {"include_usage": True}, "seed": index * 10 + turn,
            }  # fmt: skip
            records.append(await one_request(strategy, body, loop))
            if turn + 1 < len(session.user_messages):
                await asyncio.sleep(session.think_s[turn] / speedup)

    tasks = [asyncio.create_task(run_session(s, i)) for i, s in enumerate(trace.sessions)]
    _, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    unfinished = trace.requests - len([r for r in records if not math.isnan(r.end) or r.error])
    records += [Record(sent=math.nan, error="unfinished") for _ in range(max(0, unfinished))]
    return records, loop.time() - started


@contextlib.contextmanager
def simulated_fleet(count: int, slots: int, speedup: float, heterogeneous: bool) -> Iterator[list[SimProcess]]:
    sims = []
    for i, port in enumerate(free_ports(count)):
        speed = 0.6 if heterogeneous and i >= count // 2 else 1.0
        sims.append(
            SimProcess(
                port=port, slots=slots, n_ctx=16384, default_max_tokens=64,
                prefill_tokens_per_s=CALIBRATION["prefill_tokens_per_s"] * speedup * speed,
                decode_tokens_per_s=CALIBRATION["decode_tokens_per_s"] * speedup * speed,
                prefill_slows_decode=CALIBRATION["prefill_slows_decode"],
            ).launch()
        )  # fmt: skip
    try:
        for sim in sims:
            sim.wait_ready()
        yield sims
    finally:
        for sim in sims:
            sim.kill()


def deferred_total(urls: list[str]) -> int | None:
    total = 0
    for url in urls:
        try:
            total += httpx2.get(f"{url}/sim/stats").json()["deferred_total"]
        except (httpx2.HTTPError, ValueError, KeyError):
            return None  # a real llama-server has no such counter
    return total


def summarize(load: float, name: str, trace: Trace, records: list[Record], speedup: float, wall: float,
              deferred: int | None) -> Cell:  # fmt: skip
    ok = [r for r in records if r.error is None and not math.isnan(r.end)]
    scale = speedup
    ttft = [(r.first_token - r.sent) * scale for r in ok if not math.isnan(r.first_token)]
    e2e = [(r.end - r.sent) * scale for r in ok]
    wait = [(r.headers - r.sent) * scale for r in ok]
    span = (max(r.end for r in ok) - min(r.sent for r in ok)) * scale if ok else math.nan
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    oracle_share = trace.oracle_cached_tokens / trace.total_prompt_tokens if trace.total_prompt_tokens else math.nan
    share = cached / prompt if prompt else math.nan
    return Cell(
        load=load, strategy=name, requests=len(records), errors=len(records) - len(ok),
        ttft_p50_s=percentile(ttft, 50), ttft_p95_s=percentile(ttft, 95), ttft_p99_s=percentile(ttft, 99),
        e2e_p50_s=percentile(e2e, 50), e2e_p99_s=percentile(e2e, 99),
        output_tokens_per_s=sum(r.output_tokens for r in ok) / span if span else math.nan,
        cached_share=share, cached_vs_oracle=share / oracle_share if oracle_share else math.nan,
        deferred_in_backends=deferred, wait_p99_s=percentile(wait, 99), wall_s=wall,
    )  # fmt: skip


async def run_cell(
    trace: Trace, name: str, urls: list[str], args: argparse.Namespace
) -> tuple[list[Record], float, dict[str, Any]]:
    """The cell's records, its wall time and what the strategy reports of itself (our balancer's counters)."""
    strategy = make_strategy(name)
    # The simulated fleet runs --speedup times faster than real time: so do the balancer's limits.
    await strategy.start(urls, time_scale=1.0 if args.backends else args.speedup)
    try:
        deadline = max(30.0, args.duration * 4)
        records, wall = await replay(trace, strategy, args.speedup, deadline, args.model)
        return records, wall, strategy.report()
    finally:
        await strategy.close()


def print_table(cells: list[Cell]) -> None:
    columns = ("load", "strategy", "reqs", "err", "TTFT p50", "p95", "p99", "e2e p50", "p99", "out tok/s", "cache",
               "/oracle", "deferred", "wait p99")  # fmt: skip
    print("{:>5} {:<11} {:>5} {:>4} {:>9} {:>7} {:>7} {:>8} {:>7} {:>9} {:>6} {:>7} {:>8} {:>8}".format(*columns))
    for c in cells:
        deferred = "-" if c.deferred_in_backends is None else str(c.deferred_in_backends)
        print(
            f"{c.load:>5.0%} {c.strategy:<11} {c.requests:>5} {c.errors:>4} {c.ttft_p50_s:>8.2f}s "
            f"{c.ttft_p95_s:>6.2f}s {c.ttft_p99_s:>6.2f}s {c.e2e_p50_s:>7.2f}s {c.e2e_p99_s:>6.2f}s "
            f"{c.output_tokens_per_s:>9.1f} "
            f"{c.cached_share:>6.0%} {c.cached_vs_oracle:>7.0%} {deferred:>8} {c.wait_p99_s:>7.2f}s"
        )


def check_targets(cells: list[Cell]) -> list[str]:
    """The project's targets at 80% load, against round robin; returns one line per target."""
    at = {c.strategy: c for c in cells if abs(c.load - 0.8) < 1e-9}
    if "affinity" not in at or "round_robin" not in at:
        return []
    ours, rr = at["affinity"], at["round_robin"]
    lines = [
        (f"p99 TTFT {ours.ttft_p99_s:.2f} s vs round robin {rr.ttft_p99_s:.2f} s: "
         f"{ours.ttft_p99_s / rr.ttft_p99_s:.2f}x (target <= 0.3x)", ours.ttft_p99_s <= 0.3 * rr.ttft_p99_s),
        (f"throughput {ours.output_tokens_per_s:.1f} vs {rr.output_tokens_per_s:.1f} tok/s: "
         f"{ours.output_tokens_per_s / rr.output_tokens_per_s:.2f}x (target >= 1.5x)",
         ours.output_tokens_per_s >= 1.5 * rr.output_tokens_per_s),
        (f"prompt tokens from cache {ours.cached_vs_oracle:.0%} of the oracle's (target >= 90%)",
         ours.cached_vs_oracle >= 0.9),
        (f"requests deferred inside backends: {ours.deferred_in_backends} (target 0)", ours.deferred_in_backends == 0),
    ]  # fmt: skip
    return [f"{'met ' if met else 'MISSED'} {text}" for text, met in lines]


def write_results(path: Path, args: argparse.Namespace, targets: list[str], cells: list[dict[str, Any]]) -> None:
    """The run's settings, the targets' lines and every cell, as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path.write_text(json.dumps({"settings": settings, "targets": targets, "cells": cells}, indent=2) + "\n")


def draw(cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ttft, throughput, cache) = plt.subplots(1, 3, figsize=(14, 4))
    for name in dict.fromkeys(c.strategy for c in cells):
        mine = sorted((c for c in cells if c.strategy == name), key=lambda c: c.load)
        loads = [100 * c.load for c in mine]
        ttft.plot(loads, [c.ttft_p99_s for c in mine], marker="o", label=name)
        throughput.plot(loads, [c.output_tokens_per_s for c in mine], marker="o", label=name)
        cache.plot(loads, [100 * c.cached_share for c in mine], marker="o", label=name)
    ttft.set_yscale("log")
    ttft.set_title("TTFT p99 (s, log scale)")
    throughput.set_title("output tokens/s")
    cache.set_title("prompt tokens from cache (%)")
    for axis in (ttft, throughput, cache):
        axis.set_xlabel("offered load (% of capacity with cache reuse)")
        axis.grid(alpha=0.3)
    ttft.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def main_async(args: argparse.Namespace) -> list[Cell]:
    cells: list[Cell] = []
    strategies = args.strategies.split(",")
    loads = [float(x) for x in args.loads.split(",")]
    total = len(loads) * len(strategies)
    started = time.monotonic()
    speed: Mapping[str, float] = CALIBRATION
    if args.rates:
        prefill, decode = (float(x) for x in args.rates.split(","))
        speed = calibration_with(prefill, decode)
    elif args.backends and not args.calibrated:
        speed = await measure_speed(args.backends.split(","), args.model, args.slots)
        args.measured_speed = dict(speed)  # (written with the results)
        print(
            f"backends measured with every slot busy: prefill {speed['prefill_tokens_per_s']:.0f} tokens/s, decode "
            f"{speed['decode_tokens_per_s']:.1f} tokens/s (calibration: {CALIBRATION['prefill_tokens_per_s']:.0f} and "
            f"{CALIBRATION['decode_tokens_per_s']:.1f}); loads are shares of their capacity (to offer another run "
            f"the same trace: --rates {speed['prefill_tokens_per_s']:.0f},{speed['decode_tokens_per_s']:.1f})",
            flush=True,
        )
    for load in loads:
        trace = make_trace(load=load, duration_s=args.duration * args.speedup, backends=args.backends_count,
                           slots=args.slots, seed=args.seed, speed=speed)  # fmt: skip
        print(
            f"load {load:.0%}: {trace.requests} requests at {trace.requests_per_s:.2f}/s (capacity "
            f"{trace.capacity_per_s:.2f}/s with cache reuse, {trace.notes['cold_capacity_per_s']:.2f}/s all cold)",
            flush=True,
        )
        for name in strategies:
            with contextlib.ExitStack() as stack:
                if args.backends:
                    urls = args.backends.split(",")
                else:
                    sims = stack.enter_context(
                        simulated_fleet(args.backends_count, args.slots, args.speedup, args.heterogeneous)
                    )
                    urls = [sim.url for sim in sims]
                records, wall, report = await run_cell(trace, name, urls, args)
                deferred = await asyncio.to_thread(deferred_total, urls)
            cells.append(summarize(load, name, trace, records, args.speedup, wall, deferred))
            cells[-1].extra = report
            c = cells[-1]
            print(
                f"[{len(cells)}/{total} {time.monotonic() - started:5.0f}s] load {load:.0%} {name:<11} "
                f"{c.requests} requests, TTFT p99 {c.ttft_p99_s:.2f} s, cache {c.cached_share:.0%}, "
                f"{c.errors} errors",
                flush=True,
            )
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", default="0.5,0.8,0.95,1.2", help="offered loads, shares of cold capacity")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--duration", type=float, default=12.0, help="seconds of arrivals per cell (wall clock)")
    parser.add_argument("--speedup", type=float, default=8.0, help="how much faster than calibration the sim runs")
    parser.add_argument("--backends-count", type=int, default=4)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--heterogeneous", action="store_true", help="half the backends at 60%% speed")
    parser.add_argument("--backends", help="comma-separated real llama-server URLs instead of simulated ones")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--model", default=SIM_MODEL, help="the model name requests ask for (real backends: theirs)")
    parser.add_argument(
        "--calibrated", action="store_true",
        help="real backends: offer loads of the calibrated capacity instead of measuring their speed first",
    )  # fmt: skip
    parser.add_argument(
        "--rates", metavar="PREFILL,DECODE",
        help="the backends' prefill and per-stream decode tokens/s, as a measuring run printed them: "
        "runs compared side by side then replay the same trace",
    )  # fmt: skip
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.backends:
        args.speedup = 1.0
        args.backends_count = len(args.backends.split(","))

    cells = asyncio.run(main_async(args))
    print()
    print_table(cells)
    targets = check_targets(cells)
    if targets:
        print("\nat 80% load, llamacpp-ha (affinity) against round robin:")
        print("\n".join(f"  {line}" for line in targets))
    write_results(args.output_dir / "fleet.json", args, targets, [asdict(c) for c in cells])
    draw(cells, args.output_dir / "fleet.png")
    print(f"\nwrote {args.output_dir / 'fleet.json'} and {args.output_dir / 'fleet.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
