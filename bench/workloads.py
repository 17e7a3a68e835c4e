"""The routing benchmark's workloads: agent sessions, shared prefixes, a production trace, no reuse.

Each workload is fixed by a seed, so every strategy sees exactly the same requests. Prompts are
made of words from :mod:`bench.vocabulary`, each one token for the simulated llama-server and for
the real one's tokenizer, so prompt lengths below are tokens on both. Times are real seconds on
the simulated GPU (``gpu-8b`` profile).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .vocabulary import words

__all__ = ["SPEEDS", "TRACE", "WORKLOADS", "Conversation", "Fleet", "Speed", "Workload", "make_workload"]

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "mooncake_synthetic_trace.jsonl"


@dataclass(frozen=True)
class Speed:
    """How fast a backend is (shared/calibration.md), for the capacity that sets offered load."""

    prefill_curve_ms: tuple[float, float, float]
    """Prefill of n new tokens after c cached ones: t0 + a*n + b*((c+n)^2 - c^2) ms."""
    decode_tokens_per_s: float
    """One stream alone; per stream it falls as ``streams ** -0.45``."""
    stalled_token_s: float | None = None
    """Time per decoded token while a slot prefills (llama-server interleaves a prompt chunk with
    every decode step); None: decoding runs ``prefill_slows_decode`` (2x) slower then."""

    def prefill_s(self, new: int, cached: int) -> float:
        t0, a, b = self.prefill_curve_ms
        return (t0 + a * new + b * ((cached + new) ** 2 - cached**2)) / 1000

    def per_stream(self, slots: int) -> float:
        slowdown: float = slots**0.45
        return self.decode_tokens_per_s / slowdown

    def token_s(self, slots: int, prefilling: float) -> float:
        """Mean time per decoded token on a full backend that prefills ``prefilling`` of the time."""
        free_running = 1 / self.per_stream(slots)
        stalled = self.stalled_token_s if self.stalled_token_s is not None else 2 * free_running
        return prefilling * stalled + (1 - prefilling) * free_running


SPEEDS = {
    "gpu-8b": Speed((3.0, 0.041, 7.8e-7), 185.0, stalled_token_s=0.120),
    "cpu-200m": Speed((0.0, 1000 / 360, 0.0), 51.0),
}


@dataclass
class Conversation:
    """Turns sent one after the other; a one-turn conversation is a single request."""

    start_s: float
    turns: list[list[dict[str, Any]]]
    """The messages of each turn."""
    think_s: list[float]
    max_tokens: list[int]
    prompt_tokens: list[int]
    """Approximate prompt tokens of each turn (the words; the template adds a few)."""
    reusable_tokens: list[int]
    """Tokens of each turn an ideal router with an unbounded cache finds cached."""


@dataclass
class Workload:
    name: str
    conversations: list[Conversation]
    closed_loop_sessions: int = 0
    """Agent sessions kept running at once (closed loop); 0 for open-loop arrivals."""
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    def oracle_share(self) -> float:
        total = sum(sum(c.prompt_tokens) for c in self.conversations)
        return sum(sum(c.reusable_tokens) for c in self.conversations) / total if total else 0.0


def capacity_per_s(requests: list[tuple[int, int, int]], backends: int, slots: int, speed: Speed) -> float:
    """Requests/s a fleet serves when each prompt is prefilled only past its oracle-cached prefix.

    ``requests`` are ``(prompt tokens, reusable tokens, output tokens)``. A backend is limited by
    its prefill compute (one prefill at a time) and by its slots: a request holds one for its
    prefill and its decode, and decoding stalls while any slot prefills, so at ``r`` requests/s
    a backend prefilling ``r * prefill`` of the time decodes at ``speed.token_s`` per token. The
    largest rate that fits both counts (found by bisection).
    """
    prefill = [speed.prefill_s(total - reused, reused) for total, reused, _ in requests]
    mean_prefill = sum(prefill) / len(prefill)
    mean_output = sum(out for _, _, out in requests) / len(requests)

    def fits(rate: float) -> bool:
        prefilling = rate * mean_prefill
        held = mean_prefill + mean_output * speed.token_s(slots, prefilling)
        return prefilling <= 1 and rate * held <= slots

    low, high = 0.0, 1 / mean_prefill
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return backends * low


@dataclass(frozen=True)
class Fleet:
    backends: int
    slots: int
    speed: Speed
    scale: float = 1.0
    """Prompt lengths are multiplied by this (slow real backends get shorter prompts)."""
    seed: int = 11
    n_ctx: int = 65_536
    """Context per slot: longer trace requests are left out (and counted)."""

    def tokens(self, count: int) -> int:
        return max(1, round(count * self.scale))

    def capacity(self, requests: list[tuple[int, int, int]]) -> float:
        return capacity_per_s(requests, self.backends, self.slots, self.speed)


def _open_loop(rng: random.Random, conversations: list[Conversation], rate: float) -> None:
    clock = 0.0
    for conversation in conversations:
        clock += rng.expovariate(rate)
        conversation.start_s = clock


def agent_sessions(load: float, duration_s: float, fleet: Fleet) -> Workload:
    """Coding-agent sessions: a long system prompt, then tool output of 1-4k tokens per turn
    until the context holds 30-60k tokens, a few seconds of tool time between turns."""
    rng = random.Random(fleet.seed)
    output = 48
    t = fleet.tokens

    def session(index: int) -> Conversation:
        tag = f"s{index}x"
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": "You are a coding agent. " + words(tag + "sys", t(2000))},
            {"role": "user", "content": words(tag + "task", t(500))},
        ]
        target = t(rng.randint(30_000, 60_000))
        size = t(2000) + t(500)
        turns, tokens, reusable, think = [], [], [], []
        previous = 0
        while size < target:
            turns.append(list(messages))
            tokens.append(size)
            reusable.append(previous)
            think.append(rng.uniform(1.0, 4.0))
            previous = size
            call = f"call tool {index} {len(turns)} " + words(tag + f"c{len(turns)}x", 30)
            result = t(rng.randint(1_000, 4_000))
            messages.append({"role": "assistant", "content": call})
            messages.append({"role": "user", "content": words(tag + f"t{len(turns)}x", result)})
            size += 34 + result
        return Conversation(0.0, turns, think, [output] * len(turns), tokens, reusable)

    sample = [session(10_000 + i) for i in range(40)]
    shape = [(t, r, output) for c in sample for t, r in zip(c.prompt_tokens, c.reusable_tokens, strict=True)]
    capacity = fleet.capacity(shape)
    mean_prefill = sum(fleet.speed.prefill_s(total - r, r) for total, r, _ in shape) / len(shape)
    mean_turn_s = mean_prefill + output / fleet.speed.per_stream(fleet.slots)
    mean_think = sum(sum(c.think_s) for c in sample) / sum(len(c.think_s) for c in sample)
    # Little's law: sessions in flight = request rate x (think time + time per turn).
    sessions = max(1, round(load * capacity * (mean_think + mean_turn_s)))
    conversations = [session(i) for i in range(sessions * 4)]
    workload = Workload("agent", conversations, closed_loop_sessions=sessions)
    workload.notes.update(capacity_per_s=capacity, offered_per_s=load * capacity, sessions=sessions)
    return workload


def shared_prefixes(load: float, duration_s: float, fleet: Fleet) -> Workload:
    """150 system prompts of ~6k tokens, 5 questions of ~1.2k tokens each, shuffled together."""
    rng = random.Random(fleet.seed)
    output = 64
    systems = [words(f"p{i}x", fleet.tokens(rng.randint(5_000, 7_000))) for i in range(150)]
    conversations = []
    seen: set[int] = set()
    order = [(p, q) for p in range(150) for q in range(5)]
    rng.shuffle(order)
    for p, q in order:
        question = fleet.tokens(rng.randint(1_000, 1_400))
        size = len(systems[p].split()) + question
        reusable = len(systems[p].split()) if p in seen else 0
        seen.add(p)
        messages = [
            {"role": "system", "content": systems[p]},
            {"role": "user", "content": words(f"p{p}q{q}x", question)},
        ]
        conversations.append(Conversation(0.0, [messages], [0.0], [output], [size], [reusable]))
    shapes = [(c.prompt_tokens[0], c.reusable_tokens[0], output) for c in conversations]
    capacity = fleet.capacity(shapes)
    _open_loop(rng, conversations, load * capacity)
    workload = Workload("shared", conversations)
    workload.notes.update(capacity_per_s=capacity, offered_per_s=load * capacity)
    return workload


def production_trace(load: float, duration_s: float, fleet: Fleet) -> Workload:
    """The Mooncake synthetic trace, in its own order: each hash id becomes a fixed block of 512
    words, so requests share exactly the prefixes the trace says. Arrival times are scaled so the
    offered load is ``load`` of the fleet's capacity; the window is as many requests as fit."""
    rows = [json.loads(line) for line in TRACE.read_text().splitlines() if line.strip()]
    rows.sort(key=lambda row: row["timestamp"])
    too_long = [row for row in rows if fleet.tokens(row["input_length"]) + 1024 >= fleet.n_ctx]
    rows = [row for row in rows if fleet.tokens(row["input_length"]) + 1024 < fleet.n_ctx]
    seen: set[tuple[int, ...]] = set()
    shapes = []
    for row in rows:
        ids = row["hash_ids"]
        reusable = 0
        for k in range(1, len(ids) + 1):
            if tuple(ids[:k]) in seen:
                reusable = fleet.tokens(min(k * 512, row["input_length"]))
        for k in range(1, len(ids) + 1):
            seen.add(tuple(ids[:k]))
        shapes.append((fleet.tokens(row["input_length"]), reusable, min(row["output_length"], 128)))
    capacity = fleet.capacity(shapes)
    rate = load * capacity
    native_rate = len(rows) / (rows[-1]["timestamp"] / 1000)
    scale = native_rate / rate
    conversations = []
    for row, (total, reusable, output) in zip(rows, shapes, strict=True):
        start = row["timestamp"] / 1000 * scale
        if start > duration_s:
            break
        ids = row["hash_ids"]
        block = fleet.tokens(512)
        last = total - block * (len(ids) - 1)
        text = " ".join(words(f"h{h}x", block if i < len(ids) - 1 else max(1, last)) for i, h in enumerate(ids))
        messages = [{"role": "user", "content": text}]
        conversations.append(Conversation(start, [messages], [0.0], [output], [total], [reusable]))
    workload = Workload("trace", conversations)
    workload.notes.update(capacity_per_s=capacity, offered_per_s=rate, time_scale=scale, too_long=len(too_long))
    return workload


def no_reuse(load: float, duration_s: float, fleet: Fleet) -> Workload:
    """One-shot random prompts of 1-8k tokens: nothing to reuse (the control)."""
    rng = random.Random(fleet.seed)
    output = 64
    sizes = [fleet.tokens(rng.randint(1_000, 8_000)) for _ in range(2_000)]
    capacity = fleet.capacity([(s, 0, output) for s in sizes])
    conversations = []
    clock = 0.0
    for i, size in enumerate(sizes):
        clock += rng.expovariate(load * capacity)
        if clock > duration_s:
            break
        messages = [{"role": "user", "content": words(f"r{i}x", size)}]
        conversations.append(Conversation(clock, [messages], [0.0], [output], [size], [0]))
    workload = Workload("no_reuse", conversations)
    workload.notes.update(capacity_per_s=capacity, offered_per_s=load * capacity)
    return workload


WORKLOADS = {
    "agent": agent_sessions,
    "shared": shared_prefixes,
    "trace": production_trace,
    "no_reuse": no_reuse,
}


def make_workload(name: str, load: float, duration_s: float, fleet: Fleet) -> Workload:
    workload = WORKLOADS[name](load, duration_s, fleet)
    if not workload.closed_loop_sessions:
        workload.conversations = [c for c in workload.conversations if c.start_s <= duration_s]
    return workload
