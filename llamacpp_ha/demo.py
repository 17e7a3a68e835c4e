"""``python -m llamacpp_ha.demo``: balance a burst of chat conversations over simulated llama-servers.

Starts simulated backends on free 127.0.0.1 ports (no llama.cpp needed), sends several
multi-turn conversations through ``AsyncOpenAI(http_client=ha_client(cfg))``, draws the
fleet's slots while it runs, and ends with what the balancer did. ``--backend URL`` (repeatable)
uses real llama-servers instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import Counter
from typing import Any, TextIO

from ._client import HAAsyncClient, ha_client
from ._config import BackendConfig, BalancerConfig
from ._snapshot import BalancerSnapshot

TOPICS = ("llamas", "the moon", "sourdough", "chess openings", "tide pools", "jazz", "volcanoes", "origami")


def _bar(used: int, total: int) -> str:
    return "[" + "#" * used + "." * max(0, total - used) + "]"


def render(snapshot: BalancerSnapshot, done: int, total: int, elapsed: float) -> str:
    """One line of fleet state: slots in use per backend, queue depth, progress."""
    fleet = "  ".join(
        f"{b.name} {_bar(b.in_flight, b.capacity)}" if b.state == "healthy" else f"{b.name} ({b.state})"
        for b in snapshot.backends
    )
    return f"{elapsed:5.1f}s  {fleet}  queue {snapshot.queue_depth:2d}  done {done}/{total}"


async def run_demo(
    config: BalancerConfig, conversations: int, turns: int, max_tokens: int, out: TextIO
) -> BalancerSnapshot:
    from openai import AsyncOpenAI

    http: HAAsyncClient = ha_client(config)
    client = AsyncOpenAI(base_url="http://llamacpp-ha/v1", api_key="unused", http_client=http, max_retries=0)
    total = conversations * turns
    finished = 0
    served_by: Counter[str] = Counter()
    cached_tokens = 0

    async def conversation(index: int) -> None:
        nonlocal finished, cached_tokens
        topic = TOPICS[index % len(TOPICS)]
        messages: list[Any] = [
            {"role": "system", "content": "You are a patient tutor who answers in short paragraphs."},
            {"role": "user", "content": f"Conversation {index}: teach me about {topic}."},
        ]
        for turn in range(turns):
            raw = await client.chat.completions.with_raw_response.create(
                model=config_model(config), messages=messages, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True},
            )  # fmt: skip
            served_by[raw.headers["x-llamacpp-ha-backend"]] += 1
            reply = []
            async for chunk in raw.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    reply.append(chunk.choices[0].delta.content)
                if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:
                    cached_tokens += chunk.usage.prompt_tokens_details.cached_tokens or 0
            messages += [
                {"role": "assistant", "content": "".join(reply)},
                {"role": "user", "content": f"more {turn}"},
            ]
            finished += 1

    started = time.monotonic()
    await http.balancer.start()
    tasks = [asyncio.create_task(conversation(i)) for i in range(conversations)]
    while not all(task.done() for task in tasks):
        print(
            render(http.balancer.snapshot(), finished, total, time.monotonic() - started),
            file=out,
            flush=True,
        )
        await asyncio.wait(tasks, timeout=0.5)
    await asyncio.gather(*tasks)
    snapshot = http.balancer.snapshot()
    elapsed = time.monotonic() - started
    await http.aclose()

    counters = snapshot.counters
    print(f"\n{total} streamed chat turns in {elapsed:.1f} s over {len(snapshot.backends)} backends", file=out)
    for backend in snapshot.backends:
        print(f"  {backend.name:<22} {served_by[backend.name]:4d} turns  ({backend.url})", file=out)
    hits, misses = counters.affinity_hits, counters.affinity_misses
    print(f"  later turns on their conversation's backend: {hits} of {hits + misses}", file=out)
    print(f"  prompt tokens served from the backends' caches: {cached_tokens}", file=out)
    print(
        f"  longest queue wait: {counters.queue_wait_max_s * 1000:.0f} ms; retries: {counters.retries}",
        file=out,
    )
    return snapshot


def config_model(config: BalancerConfig) -> str:
    models = config.backends[0].models
    return models[0] if models else "tiny-random-llama"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llamacpp_ha.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", type=int, default=3, help="simulated backends to start (default 3)")
    parser.add_argument("--slots", type=int, default=2, help="slots per simulated backend (default 2)")
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--backend", action="append", default=[], metavar="URL", help="a real llama-server")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as stack:
        urls = list(args.backend)
        if not urls:
            from .sim import SimServer

            for _ in range(args.backends):
                sim = SimServer(slots=args.slots, decode_tokens_per_s=150, prefill_tokens_per_s=3_000)
                urls.append(stack.enter_context(sim).url)
            print(f"started {len(urls)} simulated llama-servers x {args.slots} slots: {', '.join(urls)}")
        config = BalancerConfig(backends=[BackendConfig(url=url) for url in urls], poll_interval_s=0.5)
        asyncio.run(run_demo(config, args.conversations, args.turns, args.max_tokens, sys.stdout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
