"""Routing quality on the workloads that matter: agent sessions, shared prefixes, a production trace, no reuse.

    python -m bench.routing [--workloads agent,shared,trace,no_reuse] [--loads 0.5,0.8,1.2]
                            [--duration 60] [--backends-count 4 --slots 4] [--speedup 1]
    python -m bench.routing --backends http://127.0.0.1:18081,http://127.0.0.1:18082 --slots 2 \
        --speed cpu-200m --scale 0.03 --model big-random-llama     # real CPU llama-servers

Each (workload, load, strategy) cell starts a fresh simulated fleet with the ``gpu-8b`` profile
(llama-server, Llama-3 8B shape on an H200: shared/calibration.md), replays the same seeded
requests and measures what clients see. Offered load is a share of the requests/s the fleet
serves when every prompt is prefilled only past what an ideal router finds cached. Requests are
offered for ``--duration`` seconds; throughput counts what completed in that window. Writes
bench/results/routing.json and one routing-<workload>.png per workload.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llamacpp_ha.sim import SimConfig, SimProcess, free_ports

from .fleet import Record, deferred_total, one_request, percentile, write_results
from .strategies import Strategy, make_strategy
from .workloads import SPEEDS, TRACE, WORKLOADS, Conversation, Fleet, Workload, make_workload

RESULTS = Path(__file__).parent / "results"
FLEETS = {"agent": (16, 65_536), "shared": (48, 16_384), "trace": (8, 131_072), "no_reuse": (16, 16_384)}
"""Slots (-np) and context per slot of each simulated backend, per workload: what an operator would
run for it on an H200 (16 x 64k or 48 x 16k tokens of KV, about 1M). llama-server caches one prompt
per slot (the GPU profile has no RAM prompt cache worth restoring from), so a workload's distinct
prefixes must fit in the fleet's slots for any router to reuse them."""
STRATEGIES = ("round_robin", "least_conn", "least_busy", "affinity")
SIM_MODEL = "llama-3-8b-random"


@dataclass
class Cell:
    workload: str
    load: float
    strategy: str
    requests: int
    completed: int
    errors: int
    ttft_p50_s: float
    ttft_p99_s: float
    e2e_p99_s: float
    completed_per_s: float
    output_tokens_per_s: float
    cached_share: float
    oracle_share: float
    deferred_in_backends: int | None
    balancer: dict[str, Any] = field(default_factory=dict)
    """The balancer's own view (ours only): affinity outcomes, expected vs actual cache share."""


def salted(messages: list[dict[str, Any]], salt: str) -> list[dict[str, Any]]:
    """The messages with a cell's salt in front: every cell replays the same prompts, and real
    servers (``--backends``) are not restarted between cells, so without it a strategy would find
    the prompts the strategy before it sent still cached (in slots, or llama-server's RAM cache).
    Within a cell every prompt starts with the same salt, so the reuse a cell can find is unchanged."""
    first = dict(messages[0])
    first["content"] = f"[{salt}] {first['content']}"
    return [first, *messages[1:]]


async def replay(workload: Workload, strategy: Strategy, args: argparse.Namespace) -> tuple[list[Record], float, float]:
    """Send the workload's requests; return the records, the start time and the oracle's cache
    share over the requests that completed."""
    salt = secrets.token_hex(4)
    loop = asyncio.get_running_loop()
    started = loop.time()
    window = args.duration / args.speedup
    records: list[Record] = []
    oracle: list[tuple[Record, int, int]] = []
    pending = list(reversed(workload.conversations))
    in_flight = 0

    async def send(conversation: Conversation, turn: int) -> None:
        nonlocal in_flight
        body = {
            "model": args.model, "messages": salted(conversation.turns[turn], salt),
            "max_tokens": conversation.max_tokens[turn], "stream": True,
            "stream_options": {"include_usage": True}, "seed": turn,
        }  # fmt: skip
        in_flight += 1
        record = await one_request(strategy, body, loop)
        in_flight -= 1
        records.append(record)
        oracle.append((record, conversation.reusable_tokens[turn], conversation.prompt_tokens[turn]))

    async def run(conversation: Conversation) -> None:
        for turn in range(len(conversation.turns)):
            if loop.time() - started > window:
                return
            await send(conversation, turn)
            if turn + 1 < len(conversation.turns):
                await asyncio.sleep(conversation.think_s[turn] / args.speedup)

    async def open_loop(conversation: Conversation) -> None:
        await asyncio.sleep(max(0.0, started + conversation.start_s / args.speedup - loop.time()))
        await run(conversation)

    async def closed_loop_worker(index: int) -> None:
        await asyncio.sleep(index * 0.1 / args.speedup)  # ramp up
        while pending and loop.time() - started < window:
            await run(pending.pop())

    if workload.closed_loop_sessions:
        tasks = [asyncio.create_task(closed_loop_worker(i)) for i in range(workload.closed_loop_sessions)]
    else:
        tasks = [asyncio.create_task(open_loop(c)) for c in workload.conversations]
    _, unfinished = await asyncio.wait(tasks, timeout=window + args.drain / args.speedup)
    cut = in_flight  # still waiting or streaming when the drain time ran out
    for task in unfinished:
        task.cancel()
    await asyncio.gather(*unfinished, return_exceptions=True)
    records += [Record(sent=math.nan, error="unfinished") for _ in range(cut)]
    done = [(reusable, total) for record, reusable, total in oracle if record.error is None]
    share = sum(r for r, _ in done) / sum(t for _, t in done) if done else math.nan
    return records, started, share


def summarize(workload: Workload, load: float, name: str, records: list[Record], started: float, oracle: float,
              args: argparse.Namespace, deferred: int | None) -> Cell:  # fmt: skip
    scale = args.speedup
    window_end = started + args.duration / args.speedup
    ok = [r for r in records if r.error is None and not math.isnan(r.end)]
    in_window = [r for r in ok if r.end <= window_end]
    ttft = [(r.first_token - r.sent) * scale for r in ok if not math.isnan(r.first_token)]
    prompt = sum(r.prompt_tokens for r in ok)
    return Cell(
        workload=workload.name, load=load, strategy=name, requests=len(records), completed=len(ok),
        errors=len(records) - len(ok),
        ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
        e2e_p99_s=percentile([(r.end - r.sent) * scale for r in ok], 99),
        completed_per_s=len(in_window) / args.duration,
        output_tokens_per_s=sum(r.output_tokens for r in in_window) / args.duration,
        cached_share=sum(r.cached_tokens for r in ok) / prompt if prompt else math.nan,
        oracle_share=oracle, deferred_in_backends=deferred,
    )  # fmt: skip


@contextlib.contextmanager
def simulated_fleet(args: argparse.Namespace, slots: int, n_ctx: int) -> Iterator[list[str]]:
    base = SimConfig.profile("gpu-8b")
    curve = base.prefill_curve_ms
    assert curve is not None
    sims = [
        SimProcess(port=port, **SimConfig.profile(
            "gpu-8b", slots=slots, n_ctx=n_ctx, model=SIM_MODEL + ".gguf", default_max_tokens=64, cache_ram_mib=0,
            prefill_curve_ms=tuple(x / args.speedup for x in curve),
            decode_tokens_per_s=base.decode_tokens_per_s * args.speedup,
        ).model_dump()).launch()
        for port in free_ports(args.backends_count)
    ]  # fmt: skip
    try:
        for sim in sims:
            sim.wait_ready()
        yield [sim.url for sim in sims]
    finally:
        for sim in sims:
            sim.kill()


def fleet_shape(workload: str, args: argparse.Namespace) -> tuple[int, int]:
    slots, n_ctx = FLEETS[workload]
    return (args.slots or slots), n_ctx


async def run_cell(workload: Workload, load: float, name: str, args: argparse.Namespace) -> Cell:
    slots, n_ctx = fleet_shape(workload.name, args)
    with contextlib.ExitStack() as stack:
        fleet = None if args.backends else stack.enter_context(simulated_fleet(args, slots, n_ctx))
        urls = fleet or args.backends.split(",")
        strategy = make_strategy(name)
        # The simulated backends run without a RAM prompt cache (as calibrated: --cache-ram 0), and
        # the balancer is told so; real ones run llama-server's default, the balancer's default,
        # unless told otherwise.
        ram_cache_tokens = args.ram_cache_tokens if args.backends else 0
        await strategy.start(urls, ram_cache_tokens=ram_cache_tokens)
        try:
            records, started, oracle = await replay(workload, strategy, args)
            report = strategy.report()
        finally:
            await strategy.close()
        deferred = await asyncio.to_thread(deferred_total, urls)
    cell = summarize(workload, load, name, records, started, oracle, args, deferred)
    cell.balancer = report
    return cell


def print_table(cells: list[Cell]) -> None:
    head = ("workload", "load", "strategy", "reqs", "err", "TTFT p50", "p99", "e2e p99", "done/s", "out tok/s",
            "cache", "oracle", "deferred")  # fmt: skip
    print("{:<9} {:>5} {:<11} {:>5} {:>4} {:>9} {:>8} {:>8} {:>7} {:>9} {:>6} {:>6} {:>8}".format(*head))
    for c in cells:
        deferred = "-" if c.deferred_in_backends is None else str(c.deferred_in_backends)
        print(
            f"{c.workload:<9} {c.load:>5.0%} {c.strategy:<11} {c.requests:>5} {c.errors:>4} {c.ttft_p50_s:>8.2f}s "
            f"{c.ttft_p99_s:>7.2f}s {c.e2e_p99_s:>7.2f}s {c.completed_per_s:>7.2f} {c.output_tokens_per_s:>9.0f} "
            f"{c.cached_share:>6.0%} {c.oracle_share:>6.0%} {deferred:>8}"
        )


def check_targets(cells: list[Cell]) -> list[str]:
    """The routing targets, each against the strategies it names; one line per target."""

    def at(workload: str, load: float, strategy: str) -> Cell | None:
        return next((c for c in cells if (c.workload, c.strategy) == (workload, strategy)
                     and abs(c.load - load) < 1e-9), None)  # fmt: skip

    lines: list[tuple[str, bool]] = []
    for workload in ("agent", "shared"):
        ours, rr, lc = at(workload, 0.8, "affinity"), at(workload, 0.8, "round_robin"), at(workload, 0.8, "least_conn")
        if ours and rr and lc:
            for q in ("p50", "p99"):
                mine, theirs, conn = (getattr(c, f"ttft_{q}_s") for c in (ours, rr, lc))
                lines.append((f"{workload} 80%: TTFT {q} {mine:.2f} s = {mine / theirs:.2f}x round robin (<= 0.3x), "
                              f"{mine / conn:.2f}x least_conn (<= 0.5x)",
                              mine <= 0.3 * theirs and mine <= 0.5 * conn))  # fmt: skip
            lines.append((f"{workload} 80%: cache share {ours.cached_share:.0%} = "
                          f"{ours.cached_share / ours.oracle_share:.0%} of the oracle's (>= 90%)",
                          ours.cached_share >= 0.9 * ours.oracle_share))  # fmt: skip
    ours, rr = at("agent", 1.2, "affinity"), at("agent", 1.2, "round_robin")
    if ours and rr:
        ratio = ours.completed_per_s / rr.completed_per_s if rr.completed_per_s else math.inf
        lines.append((f"agent 120%: {ours.completed_per_s:.2f} requests/s = {ratio:.2f}x round robin (>= 2x)",
                      ratio >= 2))  # fmt: skip
    for load in (0.5, 0.8, 1.2):
        ours, rr = at("trace", load, "affinity"), at("trace", load, "round_robin")
        if ours and rr:
            others = [c.cached_share for c in cells if c.workload == "trace" and c.load == load and c is not ours]
            p99 = ours.ttft_p99_s / rr.ttft_p99_s
            lines.append((f"trace {load:.0%}: TTFT p99 {ours.ttft_p99_s:.2f} s = {p99:.2f}x "
                          f"round robin (<= 0.6x); cache {ours.cached_share:.0%} vs best other {max(others):.0%}",
                          ours.ttft_p99_s <= 0.6 * rr.ttft_p99_s and ours.cached_share > max(others)))  # fmt: skip
        ours, lb = at("no_reuse", load, "affinity"), at("no_reuse", load, "least_busy")
        if ours and lb:
            ratios = [ours.ttft_p50_s / lb.ttft_p50_s, ours.ttft_p99_s / lb.ttft_p99_s,
                      lb.completed_per_s / ours.completed_per_s if ours.completed_per_s else math.inf]  # fmt: skip
            lines.append((f"no_reuse {load:.0%}: p50 {ratios[0]:.2f}x, p99 {ratios[1]:.2f}x least_busy, throughput "
                          f"{1 / ratios[2]:.2f}x (each within 5%)", all(r <= 1.05 for r in ratios)))  # fmt: skip
    deferred = [c.deferred_in_backends for c in cells if c.strategy in ("affinity", "least_busy")]
    if deferred and all(d is not None for d in deferred):
        lines.append((f"requests deferred inside backends (ours): {sum(d or 0 for d in deferred)} (target 0)",
                      sum(d or 0 for d in deferred) == 0))  # fmt: skip
    return [f"{'met   ' if met else 'MISSED'} {text}" for text, met in lines]


def draw(cells: list[Cell], output_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for workload in dict.fromkeys(c.workload for c in cells):
        mine = [c for c in cells if c.workload == workload]
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
        for name in dict.fromkeys(c.strategy for c in mine):
            rows = sorted((c for c in mine if c.strategy == name), key=lambda c: c.load)
            loads = [100 * c.load for c in rows]
            axes[0].plot(loads, [c.ttft_p50_s for c in rows], marker="o", label=name)
            axes[1].plot(loads, [c.ttft_p99_s for c in rows], marker="o", label=name)
            axes[2].plot(loads, [c.completed_per_s for c in rows], marker="o", label=name)
            axes[3].plot(loads, [100 * c.cached_share for c in rows], marker="o", label=name)
        axes[3].axhline(100 * mine[0].oracle_share, color="grey", linestyle=":", label="oracle")
        for axis, title in zip(axes, ("TTFT p50 (s, log)", "TTFT p99 (s, log)", "completed requests/s",
                                      "prompt tokens from cache (%)"), strict=True):  # fmt: skip
            axis.set_title(title)
            axis.set_xlabel("offered load (% of capacity)")
            axis.grid(alpha=0.3)
        axes[0].set_yscale("log")
        axes[1].set_yscale("log")
        axes[3].legend(fontsize=8)
        fig.suptitle(f"{workload}: 4 simulated llama-servers (8B on H200 profile)")
        fig.tight_layout()
        path = output_dir / f"routing-{workload}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


async def main_async(args: argparse.Namespace) -> list[Cell]:
    cells: list[Cell] = []
    workloads = args.workloads.split(",")
    loads = [float(x) for x in args.loads.split(",")]
    strategies = args.strategies.split(",")
    total = len(workloads) * len(loads) * len(strategies)
    started = time.monotonic()
    for name in workloads:
        for load in loads:
            slots, n_ctx = fleet_shape(name, args)
            fleet = Fleet(args.backends_count, slots, SPEEDS[args.speed], args.scale, args.seed, n_ctx)
            workload = make_workload(name, load, args.duration, fleet)
            notes = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in workload.notes.items())
            print(f"{name} at {load:.0%}: {workload.requests} requests prepared ({notes})", flush=True)
            for strategy in strategies:
                cell = await run_cell(workload, load, strategy, args)
                cells.append(cell)
                print(
                    f"[{len(cells)}/{total} {time.monotonic() - started:5.0f}s] {name} {load:.0%} {strategy:<11} "
                    f"{cell.completed}/{cell.requests} done, TTFT p50 {cell.ttft_p50_s:.2f} s p99 "
                    f"{cell.ttft_p99_s:.2f} s, {cell.completed_per_s:.2f} req/s, cache {cell.cached_share:.0%}, "
                    f"(oracle {cell.oracle_share:.0%}), deferred {cell.deferred_in_backends}"
                    + (f" {json.dumps(cell.balancer)}" if cell.balancer else ""),
                    flush=True,
                )
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--loads", default="0.5,0.8,1.2")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of offered requests per cell")
    parser.add_argument("--drain", type=float, default=30.0, help="seconds to let requests finish afterwards")
    parser.add_argument("--backends-count", type=int, default=4)
    parser.add_argument("--slots", type=int, help="slots per backend (llama-server -np); default: per workload")
    parser.add_argument("--speedup", type=float, default=1.0, help="run the simulated GPU this much faster")
    parser.add_argument("--backends", help="comma-separated real llama-server URLs instead of simulated ones")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every prompt length (slow backends)")
    parser.add_argument("--speed", choices=sorted(SPEEDS), default="gpu-8b", help="backend speed, for the load")
    parser.add_argument("--model", default=SIM_MODEL, help="the model name requests ask for")
    parser.add_argument("--ram-cache-tokens", type=int, help="real backends' RAM prompt cache, for the balancer "
                        "(0 for llama-server --cache-ram 0; default: the balancer's default)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--output-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.backends:
        args.backends_count = len(args.backends.split(","))
    if "trace" in args.workloads.split(",") and not TRACE.exists():
        # Checked now, not when the trace's turn comes after the other workloads' half hour.
        parser.error(f"the trace workload needs {TRACE} (run from a checkout beside shared/)")

    cells = asyncio.run(main_async(args))
    print()
    print_table(cells)
    targets = check_targets(cells)
    if targets:
        print("\ntargets (llamacpp-ha's default policy, 'affinity'):")
        print("\n".join(f"  {line}" for line in targets))
    stem = "routing" if not args.backends else "routing-real"
    write_results(args.output_dir / f"{stem}.json", args, targets, [asdict(c) for c in cells])
    if not args.backends:
        for path in draw(cells, args.output_dir):
            print(f"wrote {path}")
    print(f"wrote {args.output_dir / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
